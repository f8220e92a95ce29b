"""The MeanFlow objective: a model of the average velocity over an interval, sampled in one or a
few steps."""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmkit import Solution, Solver, hookimpl
from fmkit.batch import Batch, Cond
from fmkit.objective import Draws, Loss, Model, Objective, check_dropout, drop_conditions
from fmkit.path import ProbabilityPath
from fmkit.sampling import Sampling
from fmkit_plugins.times import TIME_SAMPLING, TimeSampling


# Geng et al. 2025, "Mean Flows for One-step Generative Modeling". In fmkit's time convention
# (t = 0 noise, t = 1 data) the average velocity from t to r >= t is
#     u(x_t, t, r) = 1 / (r - t) * integral_t^r v(x_s, s) ds,  so  x_r = x_t + (r - t) u,
# and differentiating (r - t) u = integral_t^r v ds in t gives the MeanFlow identity
#     u(x_t, t, r) = v(x_t, t) + (r - t) d/dt u(x_t, t, r),
# with d/dt u = v . grad_x u + du/dt, one Jacobian-vector product with tangent (v, 1).
class MeanFlowObjective(Objective):
    """Regress u(x_t, t, r) on the identity's right-hand side (gradient stopped), with the
    path's conditional velocity for v. The backbone gets r as `cond["r"]`.

    Args:
        path: the probability path.
        times: the distribution of the two times (each drawn from it, then ordered so that
            t <= r).
        equal_fraction: the fraction of samples with r = t (plain flow matching), which
            anchors the instantaneous velocity (the paper's best: 0.75).
        adaptive_p: the loss weight 1 / (||error||^2 + 1e-3) ** p per sample (the paper's
            adaptive weighting; 0 is the plain squared error).
        cond_dropout, attribute_dropout: condition dropout as in flow matching.
    """

    backbone_needs = ("two_times",)  # u(x, t, r) takes the interval's end r

    def __init__(
        self,
        path: ProbabilityPath,
        times: TimeSampling,
        equal_fraction: float,
        adaptive_p: float,
        cond_dropout: float,
        attribute_dropout: float,
    ) -> None:
        self.path, self.times = path, times
        self.equal_fraction, self.adaptive_p = equal_fraction, adaptive_p
        self.cond_dropout, self.attribute_dropout = cond_dropout, attribute_dropout

    def loss(self, model: Model, batch: Batch, draws: Draws) -> Loss:
        x1 = batch.images  # (B, C, H, W)
        x0 = draws.normal(*x1.shape[1:]).to(x1.dtype)
        a, b = self.times.draw(draws), self.times.draw(draws)
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        r = torch.where(draws.uniform() < self.equal_fraction, t, r)  # (B,)
        cond = drop_conditions(batch.cond, draws, self.cond_dropout, self.attribute_dropout)
        error = self.error(model, x0, x1, t, r, cond)  # (B,)
        weight = 1.0 / (error.detach() + 1e-3) ** self.adaptive_p
        return Loss((weight * error).mean(), {"mse": error.detach().mean()})

    def error(
        self, model: Model, x0: Tensor, x1: Tensor, t: Tensor, r: Tensor, cond: Cond | None
    ) -> Tensor:
        """(B,) mean squared error of u against the MeanFlow target at times t <= r."""
        target = self.path.sample(x0, x1, t)
        v = target.velocity

        # One forward pass with dual numbers gives u and its derivative along (v, 1). Forward-
        # mode AD through the module (not torch.func.jvp, which DDP's reducer cannot follow);
        # fused attention kernels (flash, memory-efficient) have no forward derivative, so
        # attention runs in its plain math form here.
        with sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level(), _quiet_torch_internals():
            x_dual = forward_ad.make_dual(target.x_t, v)
            t_dual = forward_ad.make_dual(t, torch.ones_like(t))
            u, dudt = forward_ad.unpack_dual(model(x_dual, t_dual, {**(cond or {}), "r": r}))
        gap = (r - t).view(-1, *(1,) * (x1.dim() - 1)).to(v.dtype)
        wanted = (v + gap * dudt).detach()
        return ((u.float() - wanted.float()) ** 2).flatten(1).mean(1)

    def sampling(self) -> Sampling:
        """One jump from noise to data (`fmkit sample --steps 2` or 4 jump more often)."""
        return Sampling(solver="euler", steps=1, solver_opts={"schedule": "uniform"})

    def velocity(self, model: Model, cond: Cond | None = None):
        """The instantaneous velocity u(x, t, t), for adaptive solvers and likelihoods."""

        def field(t: Tensor, x: Tensor) -> Tensor:
            times = t.to(x.dtype).expand(x.shape[0])
            return model(x, times, {**(cond or {}), "r": times})

        return field

    def generate(
        self,
        model: Model,
        noise: Tensor,
        solver: Solver,
        cond: Cond | None = None,
        times: Tensor | None = None,
    ) -> Solution:
        """Jump along the solver's time grid: x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k,
        t_{k+1}), one evaluation per step (`--steps 1` is one-step generation). An adaptive
        solver integrates the instantaneous velocity u(x, t, t) instead.

        Jumps have no states in between: when `times` asks for a trajectory (K > 2 times),
        the trajectory is the noise and the state after each jump at the grid's times
        (`Solution.times`), or K of them spread evenly when there are more jumps."""
        if solver.adaptive:
            return super().generate(model, noise, solver, cond, times)
        grid_of = getattr(solver, "grid", None)
        if grid_of is not None:
            grid = grid_of(0.0, 1.0)
        else:  # a third-party fixed-step solver without a grid: uniform steps
            grid = torch.linspace(0, 1, getattr(solver, "steps", 1) + 1, dtype=torch.float64)
        grid = grid.to(noise.device, noise.dtype)
        x, states = noise, [noise]
        for t, r in zip(grid[:-1], grid[1:], strict=True):
            start = t.expand(x.shape[0])
            x = x + (r - t) * model(x, start, {**(cond or {}), "r": r.expand(x.shape[0])})
            states.append(x)
        wanted = 2 if times is None else max(2, len(times))
        keep = torch.linspace(0, len(states) - 1, min(wanted, len(states))).round().long()
        trajectory = torch.stack([states[i] for i in keep.tolist()])
        return Solution(x, trajectory, len(grid) - 1, grid[keep.to(grid.device)])


def meanflow(
    *,
    path: ProbabilityPath,
    time_sampling: Literal[TIME_SAMPLING] = "logit_normal",
    time_loc: float = 0.4,
    time_scale: float = 1.0,
    equal_fraction: float = 0.75,
    adaptive_p: float = 1.0,
    cond_dropout: float = 0.1,
    attribute_dropout: float = 0.5,
) -> MeanFlowObjective:
    """MeanFlow (Geng et al. 2025), one-step generation; turns on the backbone's two_times.

    Options: time_sampling, time_loc, time_scale (the paper's logit-normal(-0.4, 1), which
    leans to the data end; here t = 1 is data, so loc 0.4), equal_fraction (share of r = t), adaptive_p (loss weighting power),
    cond_dropout, attribute_dropout.
    """
    if not 0 <= equal_fraction <= 1:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
    if adaptive_p < 0:
        raise ValueError(f"adaptive_p must be non-negative, got {adaptive_p}")
    check_dropout(cond_dropout, attribute_dropout)
    return MeanFlowObjective(
        path, TimeSampling(time_sampling, time_loc, time_scale, path), equal_fraction,
        adaptive_p, cond_dropout, attribute_dropout,
    )  # fmt: skip


@hookimpl
def register_objectives(register):
    register("meanflow", meanflow)


@contextlib.contextmanager
def _quiet_torch_internals():
    """torch's forward-mode AD loads its own decompositions with torch.jit.script on first use,
    which warns that torch.jit.script is deprecated: a note to torch's developers, nothing a
    user of fmkit can act on, so it is silenced here (and only that warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        yield

"""Flow-map distillation: a few-step student learnt from a trained flow-matching teacher's
velocity (`fmkit train --objective distill --init-from TEACHER`)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmkit import hookimpl
from fmkit.batch import Batch, Cond
from fmkit.errors import FmkitError
from fmkit.objective import Draws, Loss, Model, check_dropout, drop_conditions
from fmkit.path import ProbabilityPath
from fmkit.sampling import Sampling
from fmkit.teacher import Teacher
from fmkit_plugins.meanflow import MeanFlowObjective, _quiet_torch_internals
from fmkit_plugins.times import TIME_SAMPLING, TimeSampling


# Boffi, Albergo & Vanden-Eijnden 2024, "Flow Map Matching" (Lagrangian and Eulerian map
# distillation), and 2025, "How to build a consistency model: Learning flow maps via
# self-distillation". The student is a flow map in MeanFlow's parametrisation,
# X_{t,r}(x) = x + (r - t) u(x, t, r) (fmkit's time: t = 0 noise, 1 data), and the teacher's
# velocity v defines the map it should be:
#   Lagrangian: d/dr X_{t,r}(x) = v(X_{t,r}(x), r), i.e. u + (r - t) du/dr = v(X_{t,r}(x), r)
#   Eulerian:   d/dt X_{t,r}(x) + v(x, t) . grad_x X_{t,r}(x) = 0, i.e. (MeanFlow's identity
#               with the teacher's velocity) u = v(x, t) + (r - t) (v . grad_x u + du/dt)
# Each is regressed with the derivative term's gradient stopped, one forward pass with dual
# numbers for it. Unlike MeanFlow from scratch, v is the teacher's marginal velocity, not the
# noisy conditional one.
class FlowMapDistillation(MeanFlowObjective):
    """Regress the student u(x_t, t, r) on the teacher's flow map. Samples like MeanFlow: one
    evaluation per jump along the solver's grid.

    Args:
        path: the probability path (the teacher's) that makes the states x_t.
        teacher: the trained model (fmkit.teacher.Teacher: frozen, guidance folded in);
            None for a student that only samples (a loaded model).
        times: the distribution of the two times (each drawn, then ordered: t <= r).
        form: "lagrangian" (the teacher at the jump's end) or "eulerian" (at its start).
        equal_fraction: share of samples with r = t, where the target is the teacher's
            velocity itself (it keeps the student's instantaneous velocity the teacher's).
        adaptive_p: per-sample loss weight 1 / (error + 1e-3)^p, as MeanFlow's.
        cond_dropout, attribute_dropout: condition dropout, so the student also learns the
            teacher's unconditional map (a conditional student is then never guided: its
            guidance is in what it learnt).
        jumps: the student's default number of jumps (`fmkit sample --steps` changes it).
    """

    def __init__(
        self,
        path: ProbabilityPath,
        teacher: Teacher | None,
        times: TimeSampling,
        form: str,
        equal_fraction: float,
        adaptive_p: float,
        cond_dropout: float,
        attribute_dropout: float,
        jumps: int,
    ) -> None:
        super().__init__(path, times, equal_fraction, adaptive_p, cond_dropout, attribute_dropout)
        self.teacher, self.form, self.jumps = teacher, form, jumps

    def loss(self, model: Model, batch: Batch, draws: Draws) -> Loss:
        if self.teacher is None:
            raise FmkitError("objective 'distill' learns from a teacher: train it with --init-from")
        x1 = batch.images  # (B, C, H, W)
        x0 = draws.normal(*x1.shape[1:]).to(x1.dtype)
        a, b = self.times.draw(draws), self.times.draw(draws)
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        r = torch.where(draws.uniform() < self.equal_fraction, t, r)  # (B,)
        cond = drop_conditions(batch.cond, draws, self.cond_dropout, self.attribute_dropout)
        x_t = self.path.sample(x0, x1, t).x_t
        error = self.distillation_error(model, x_t, t, r, cond)  # (B,)
        weight = 1.0 / (error.detach() + 1e-3) ** self.adaptive_p
        return Loss((weight * error).mean(), {"mse": error.detach().mean()})

    def target(self, model: Model, x: Tensor, t: Tensor, r: Tensor, cond: Cond | None):
        """(u, target) at states x (B, C, H, W) and times t <= r (B,): the student's average
        velocity and what the teacher's flow map says it should be (no gradient)."""
        gap = (r - t).view(-1, *(1,) * (x.dim() - 1)).to(x.dtype)
        with sdpa_kernel(SDPBackend.MATH), forward_ad.dual_level(), _quiet_torch_internals():
            if self.form == "lagrangian":  # tangent on r alone: du/dr
                r_dual = forward_ad.make_dual(r, torch.ones_like(r))
                u, du = forward_ad.unpack_dual(model(x, t, {**(cond or {}), "r": r_dual}))
                end = (x + gap * u).detach()  # X_{t,r}(x)
                v = self.teacher.velocity(end, r, cond)
                return u, (v - gap * du).detach()
            v = self.teacher.velocity(x, t, cond)  # eulerian: tangent (v, 1) in (x, t)
            x_dual = forward_ad.make_dual(x, v)
            t_dual = forward_ad.make_dual(t, torch.ones_like(t))
            u, du = forward_ad.unpack_dual(model(x_dual, t_dual, {**(cond or {}), "r": r}))
            return u, (v + gap * du).detach()

    def distillation_error(
        self, model: Model, x: Tensor, t: Tensor, r: Tensor, cond: Cond | None
    ) -> Tensor:
        """(B,) mean squared error of the student against its target."""
        u, wanted = self.target(model, x, t, r, cond)
        return ((u.float() - wanted.float()) ** 2).flatten(1).mean(1)

    def sampling(self) -> Sampling:
        """`jumps` jumps on a uniform grid, unguided (the teacher's guidance is learnt)."""
        return Sampling(
            solver="euler", steps=self.jumps, solver_opts={"schedule": "uniform"}, guidance=1.0
        )


def distill(
    *,
    path: ProbabilityPath,
    teacher: Teacher | None = None,
    form: Literal["lagrangian", "eulerian"] = "lagrangian",
    time_sampling: Literal[TIME_SAMPLING] = "logit_normal",
    time_loc: float = 0.0,
    time_scale: float = 1.0,
    equal_fraction: float = 0.25,
    adaptive_p: float = 1.0,
    cond_dropout: float = 0.1,
    attribute_dropout: float = 0.5,
    guidance: float | None = None,
    jumps: int = 4,
) -> FlowMapDistillation:
    """Flow-map distillation (Boffi et al. 2024) from the --init-from teacher; 1-4 jumps.

    Options: form (lagrangian, eulerian), time_sampling, time_loc, time_scale, equal_fraction
    (share of r = t), adaptive_p, cond_dropout, attribute_dropout, guidance (the teacher's
    weight folded into the student; default: the teacher's own), jumps (default steps).
    """
    if form not in ("lagrangian", "eulerian"):
        raise ValueError(f"form must be lagrangian or eulerian, got {form}")
    if not 0 <= equal_fraction <= 1:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
    if jumps < 1:
        raise ValueError(f"jumps must be at least 1, got {jumps}")
    check_dropout(cond_dropout, attribute_dropout)
    if guidance is not None and teacher is not None:
        teacher.guidance = guidance
    return FlowMapDistillation(
        path, teacher, TimeSampling(time_sampling, time_loc, time_scale, path), form,
        equal_fraction, adaptive_p, cond_dropout, attribute_dropout, jumps,
    )  # fmt: skip


@hookimpl
def register_objectives(register):
    register("distill", distill)

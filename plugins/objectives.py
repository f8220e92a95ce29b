"""The built-in training objective: flow matching."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fmkit import hookimpl
from fmkit.batch import Batch, Cond
from fmkit.errors import FmkitError
from fmkit.objective import Draws, Loss, Model, Objective, check_dropout, drop_conditions
from fmkit.path import ProbabilityPath
from fmkit_plugins.coupling import COUPLINGS, SCOPES, couple
from fmkit_plugins.times import TIME_SAMPLING, TimeSampling


# Lipman et al. 2023, "Flow Matching for Generative Modeling": regress the conditional
# velocity of a probability path at times drawn from a time distribution.
class FlowMatchingObjective(Objective):
    """Plain flow matching with noise drawn independently of the data.

    Args:
        path: the probability path from noise (t = 0) to data (t = 1).
        times: the distribution of training times (fmkit_plugins.times).
        cond_dropout: probability of training a sample without its condition (for
            classifier-free guidance; unconditional data has none to drop).
        attribute_dropout: with attributes, the probability of leaving out each one.
        coupling: how noise is paired with images: "independent", "ot" (minibatch optimal
            transport, exact) or "sinkhorn" (entropic); see fmkit_plugins.coupling.
        coupling_scope: "global" (every process's micro-batch together) or "local".
        coupling_reg: Sinkhorn's entropy weight, relative to the mean squared distance.
    """

    def __init__(
        self,
        path: ProbabilityPath,
        times: TimeSampling,
        cond_dropout: float = 0.1,
        attribute_dropout: float = 0.5,
        coupling: str = "independent",
        coupling_scope: str = "global",
        coupling_reg: float = 0.05,
    ) -> None:
        self.path, self.times = path, times
        self.cond_dropout, self.attribute_dropout = cond_dropout, attribute_dropout
        self.coupling, self.coupling_scope, self.coupling_reg = (
            coupling,
            coupling_scope,
            coupling_reg,
        )

    def loss(self, model: Model, batch: Batch, draws: Draws) -> Loss:
        x1 = batch.images  # (B, C, H, W)
        x0, logs = self.noise(x1, batch.cond, draws)
        t = self.times.draw(draws)  # (B,)
        cond = drop_conditions(batch.cond, draws, self.cond_dropout, self.attribute_dropout)
        return Loss(self.regress(model, x0, x1, t, cond), logs)

    def noise(self, x1: Tensor, cond: Cond | None, draws: Draws) -> tuple[Tensor, dict]:
        """(B, C, H, W) noise for the images x1, coupled as `coupling` says, and the logs."""
        if self.coupling == "independent":
            return draws.normal(*x1.shape[1:]).to(x1.dtype), {}
        full = draws.normal_all(*x1.shape[1:]).to(x1.dtype)  # (global B, C, H, W)
        groups = draws.group_rows() if self.coupling_scope == "global" else [draws.rows]
        noise = torch.cat([full[rows] for rows in groups])
        mine = groups.index(draws.rows)  # this process's rows start after the earlier ranks'
        first = sum(rows.stop - rows.start for rows in groups[:mine])
        x0, seconds = couple(
            noise, x1, first, cond, self.coupling, len(groups) > 1, self.coupling_reg,
            draws.generator("cpu") if self.coupling == "sinkhorn" else None,
        )  # fmt: skip
        return x0, {"coupling_s": torch.tensor(seconds, device=x1.device)}

    def regress(self, model: Model, x0: Tensor, x1: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        """Mean squared error between the model's and the path's velocity at (x0, x1, t)."""
        target = self.path.sample(x0, x1, t)
        predicted = model(target.x_t, target.t, cond)  # (B, C, H, W)
        return torch.mean((predicted.float() - target.velocity.float()) ** 2)


# Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
# Rectified Flow": flow matching on a teacher's fixed noise-image pairs straightens the flow.
class ReflowObjective(FlowMatchingObjective):
    """Flow matching whose noise is each image's paired noise (from `fmkit reflow`), not an
    independent draw; times and condition dropout as in flow matching."""

    def loss(self, model: Model, batch: Batch, draws: Draws) -> Loss:
        if batch.noise is None:
            raise FmkitError(
                "the reflow objective trains on noise-image pairs: pass --data-dir of a folder "
                "written by `fmkit reflow`"
            )
        x1 = batch.images
        t = self.times.draw(draws)  # (B,)
        cond = drop_conditions(batch.cond, draws, self.cond_dropout, self.attribute_dropout)
        return Loss(self.regress(model, batch.noise.to(x1.dtype), x1, t, cond))


def flow_matching(
    *,
    path: ProbabilityPath,
    time_sampling: Literal[TIME_SAMPLING] = "logit_normal",
    time_loc: float = 0.0,
    time_scale: float = 1.0,
    cond_dropout: float = 0.1,
    attribute_dropout: float = 0.5,
    coupling: Literal[COUPLINGS] = "independent",
    coupling_scope: Literal[SCOPES] = "global",
    coupling_reg: float = 0.05,
) -> FlowMatchingObjective:
    """Flow matching (Lipman et al. 2023); options time sampling, condition dropout, coupling.

    Options: time_sampling (logit_normal by default: the best final samples at equal steps in
    benchmarks/quality.py; uniform, edm), time_loc, time_scale; cond_dropout and
    attribute_dropout for conditional training (classifier-free guidance); coupling
    (independent, ot, sinkhorn: minibatch optimal transport, Tong et al. 2024),
    coupling_scope (global, local), coupling_reg.
    """
    if coupling_reg <= 0:
        raise ValueError(f"coupling_reg must be positive, got {coupling_reg}")
    check_dropout(cond_dropout, attribute_dropout)
    return FlowMatchingObjective(
        path, TimeSampling(time_sampling, time_loc, time_scale, path), cond_dropout,
        attribute_dropout, coupling, coupling_scope, coupling_reg,
    )  # fmt: skip


def reflow(
    *,
    path: ProbabilityPath,
    time_sampling: Literal[TIME_SAMPLING] = "logit_normal",
    time_loc: float = 0.0,
    time_scale: float = 1.0,
    cond_dropout: float = 0.1,
    attribute_dropout: float = 0.5,
) -> ReflowObjective:
    """Reflow (Liu et al. 2023) on pairs from `fmkit reflow`; flow matching's options."""
    plain = flow_matching(
        path=path, time_sampling=time_sampling, time_loc=time_loc, time_scale=time_scale,
        cond_dropout=cond_dropout, attribute_dropout=attribute_dropout,
    )  # fmt: skip
    return ReflowObjective(**vars(plain))


@hookimpl
def register_objectives(register):
    register("flow_matching", flow_matching)
    register("reflow", reflow)

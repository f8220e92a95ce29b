"""Training times: the distributions flow-matching objectives (flow matching, reflow, MeanFlow)
draw t in (0, 1) from, as one component they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fmkit.objective import Draws
from fmkit.path import ProbabilityPath

TIME_SAMPLING = ("uniform", "logit_normal", "edm")

# Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") draw
# training noise levels as ln(sigma) ~ N(P_mean, P_std^2); the path maps a noise level to t.
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


@dataclass(frozen=True)
class TimeSampling:
    """A distribution of training times t in (0, 1).

    Attributes:
        method: "uniform"; "logit_normal" (Esser et al. 2024, "Scaling Rectified Flow
            Transformers"): t = sigmoid(loc + scale * n), n ~ N(0, 1), which spends more of
            the training signal on intermediate times; or "edm" (Karras et al. 2022): EDM's
            log-normal noise levels mapped to t by `path` (on the linear path, skewed towards
            the data end).
        loc, scale: the logit-normal location and scale (not used by the others).
        path: the probability path, which maps edm's noise levels to times.
    """

    method: str = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0
    path: ProbabilityPath | None = None

    def __post_init__(self) -> None:
        if self.method not in TIME_SAMPLING:
            raise ValueError(
                f"unknown time sampling {self.method!r}; available: {', '.join(TIME_SAMPLING)}"
            )
        if not self.scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.scale}")
        if self.method == "edm" and self.path is None:
            raise ValueError("edm time sampling needs the probability path (noise level -> t)")

    def draw(self, draws: Draws) -> Tensor:
        """(n,) times for this micro-batch from the step's seeded draws."""
        return self.from_base(draws.uniform() if self.method == "uniform" else draws.normal())

    def sample(self, batch: int, generator=None, device=None) -> Tensor:
        """(batch,) times drawn from `generator` (the seed API's FlowMatching.loss)."""
        draw = torch.rand if self.method == "uniform" else torch.randn
        return self.from_base(draw(batch, generator=generator, device=device))

    def from_base(self, base: Tensor) -> Tensor:
        """Times from base draws: uniform ones for "uniform", standard normal ones otherwise."""
        if self.method == "uniform":
            return base
        if self.method == "logit_normal":
            return torch.sigmoid(self.loc + self.scale * base)
        return self.path.t_from_noise_ratio(torch.exp(EDM_P_MEAN + EDM_P_STD * base))


def sample_time(
    batch: int,
    method: str = "uniform",
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    path: ProbabilityPath | None = None,
) -> Tensor:
    """Training times t in (0, 1), shape (batch,), of the TimeSampling `method` (with `loc`,
    `scale` and `path`)."""
    return TimeSampling(method, loc, scale, path).sample(batch, generator, device)

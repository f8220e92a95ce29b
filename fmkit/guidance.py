"""Classifier-free guidance (Ho & Salimans 2022), limited to an interval of times, with the
count of network evaluations every sampler reports."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fmkit.batch import Cond, call_model
from fmkit.conditions import condition_keys, unconditional


class GuidedModel:
    """A backbone (or any network(x, t[, cond]) callable) as objectives call it, model(x, t,
    cond), with classifier-free guidance (Ho & Salimans 2022), and a count of network
    evaluations.

    With guidance w, the output is v_u + w (v_c - v_u): v_c given the conditions, v_u with
    every condition unspecified, both from one batched forward pass (counted as 2 NFE). w = 1
    is the conditional model alone, w = 0 the unconditional one (1 NFE each). Guidance can be
    limited to times in `interval` (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality"); outside it the model is conditional.
    """

    def __init__(
        self,
        module: nn.Module | Callable[..., Tensor],
        guidance: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        watch: Callable[[int], None] | None = None,
    ) -> None:
        self.module, self.guidance, self.interval = module, guidance, interval
        self.nfe = 0
        self.watch = watch  # hears the running NFE after each evaluation (progress bars)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        w = self.guidance
        # Guidance needs a condition to leave out: a second time "r" alone is not one.
        if cond is None or w == 1.0 or not condition_keys(cond) or not self._inside(t):
            return self._counted(1, call_model(self.module, x, t, cond))
        free = unconditional(cond)
        if w == 0.0:
            return self._counted(1, call_model(self.module, x, t, free))
        both = {k: torch.cat([cond[k], free[k]]) for k in cond}
        v_c, v_u = call_model(self.module, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return self._counted(2, v_u + w * (v_c - v_u))

    def _counted(self, evaluations: int, v: Tensor) -> Tensor:
        self.nfe += evaluations
        if self.watch is not None:
            self.watch(self.nfe)
        return v

    def _inside(self, t: Tensor) -> bool:
        lo, hi = self.interval
        if lo <= 0.0 and hi >= 1.0:
            return True
        now = float(t.reshape(-1)[0])  # one time for the whole batch during a solve
        return lo - 1e-6 <= now <= hi + 1e-6  # a grid point on the edge (in float32) is inside

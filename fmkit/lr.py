"""The learning rate of each optimizer step: linear warm-up, then constant or decaying."""

from __future__ import annotations

import math


def learning_rate(
    step: int, base: float, warmup: int, total: int | None, schedule: str = "constant"
) -> float:
    """The learning rate of optimizer step `step` (1 for the first).

    Warm-up rises linearly to `base` over `warmup` steps; after it, `schedule` "constant" stays
    at `base`, "cosine" follows half a cosine (Loshchilov & Hutter, "SGDR", 2017) and "linear"
    a line, both reaching 0 at step `total`. A run whose length is unknown (`total` None) stays
    constant; `fmkit train` refuses a decay it cannot place.
    """
    if warmup and step < warmup:
        return base * step / warmup
    if schedule == "constant" or total is None:
        return base
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base * (1.0 - progress)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")

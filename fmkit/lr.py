"""The learning rate of each optimizer step: linear warm-up, then constant or decaying."""

from __future__ import annotations

import math

from fmkit.errors import FmkitError


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


DEFAULT = "cosine"  # when the run's length is known (docs/benchmarks.md, two budgets)


def plan(cfg, steps_per_epoch: int | None) -> tuple[int | None, str]:
    """A run's last step and its schedule: --max-steps, else its epochs' steps (None for data
    of unknown length, e.g. shards); --lr-schedule, else cosine when the length is known and
    constant when it is not. A decay asked for that cannot be placed is an error, raised
    before any work."""
    total = cfg.max_steps
    if total is None and steps_per_epoch is not None:
        total = steps_per_epoch * cfg.epochs
    schedule = cfg.lr_schedule or (DEFAULT if total is not None else "constant")
    if total is None and schedule != "constant":
        raise FmkitError(
            f"--lr-schedule {schedule} decays to 0 at the last step, and the length of "
            f"dataset '{cfg.dataset}' is unknown: set --max-steps"
        )
    return total, schedule

"""Watching for a non-finite loss or gradient without stalling the GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from fmkit import distributed
from fmkit.errors import FmkitError


class NonFinite:
    """A non-finite loss or gradient norm, recorded on the device (the first bad step and its
    value) and looked at only where the loop synchronises anyway (logs, grids, saves): a Python
    `if` on a CUDA tensor every step would stall the CPU until the GPU caught up."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros((), dtype=torch.long, device=device)  # step number, 0: none
        self.value = torch.zeros((), device=device)
        self.is_loss = torch.zeros((), dtype=torch.bool, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss_ok, norm_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
        new = (self.first == 0) & ~(loss_ok & norm_ok)
        self.first.copy_(torch.where(new, step, self.first))
        bad = torch.where(loss_ok, grad_norm, loss).float()
        self.value.copy_(torch.where(new, bad, self.value))
        self.is_loss.copy_(torch.where(new, ~loss_ok, self.is_loss))

    def check(self, step: int, last_saved: Path | None, info: distributed.DistInfo) -> None:
        """Raise on every rank alike once any rank saw a non-finite value (collective)."""
        anywhere = distributed.maximum(self.first, info)
        if (bad_step := int(anywhere.item())) == 0:
            return
        if int(self.first.item()) != bad_step:  # another rank saw it: no local value to show
            raise FmkitError(f"another rank's loss became non-finite at step {bad_step}; stopped")
        kept = (
            f"the last good checkpoint is {last_saved}"
            if last_saved
            else "no checkpoint was written yet"
        )
        what = "loss" if self.is_loss.item() else "gradient norm"
        raise FmkitError(
            f"{what} became {self.value.item()} at step {bad_step}; stopped at step {step}, {kept}"
        )

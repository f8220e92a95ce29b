"""What a training run records as it goes: a line of metrics.jsonl per logged step and, when
the tensorboard package is installed, the same scalars for TensorBoard."""

from __future__ import annotations

import json

from fmkit.folders import Claim


class RunLog:
    """The run folder's logs (rank 0 only), opened once the first step has worked.

    Args:
        folder: the run folder's claim; metrics.jsonl and tensorboard/ are recorded in it.
    """

    def __init__(self, folder: Claim) -> None:
        self.metrics = open(folder.path("metrics.jsonl"), "a")
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.board = SummaryWriter(str(folder.path("tensorboard")))

    def write(self, row: dict) -> None:
        """One logged step: {"step", "epoch", "loss", ...} as a JSON line (flushed at once, so
        a run that dies keeps what it logged) and as TensorBoard scalars."""
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.board is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.board.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.metrics.close()
        if self.board is not None:
            self.board.close()

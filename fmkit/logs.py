"""What a training run records as it goes: a line of metrics.jsonl per logged step and the
same scalars for one logger besides it (TensorBoard or Weights & Biases, optional extras)."""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path

from fmkit.errors import FmkitError
from fmkit.folders import Claim, write_atomic

LOGGERS = {  # --logger NAME: the module it needs, and the extra that installs it
    "tensorboard": ("tensorboard", "pip install 'fmkit[tensorboard]'"),
    "wandb": ("wandb", "pip install 'fmkit[wandb]'"),
}


def check_logger(name: str) -> str:
    """The logger `--logger name` will use ("auto": tensorboard when installed, else none);
    one that is not installed is an error, raised before the run writes anything."""
    if name == "auto":
        return "tensorboard" if _importable("tensorboard") else "none"
    if name in LOGGERS and not _importable(LOGGERS[name][0]):
        raise FmkitError(f"--logger {name} needs the {name} package: {LOGGERS[name][1]}")
    return name


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class RunLog:
    """The run folder's logs (rank 0 only), opened once the first step has worked.

    Args:
        folder: the run folder's claim; metrics.jsonl (and tensorboard/ or wandb/) go there.
        logger: "tensorboard", "wandb" or "none" (see `check_logger`).
        resumed_at: the step a resumed run continues from: lines of later steps (taken after
            that checkpoint, and about to be taken again) leave metrics.jsonl, so no step is
            in it twice. 0 for a new run.
        config: the run's settings, for loggers that keep them (W&B).
    """

    def __init__(self, folder: Claim, logger: str, resumed_at: int, config: dict) -> None:
        path = folder.path("metrics.jsonl")
        if resumed_at and path.exists():
            _keep_until(path, resumed_at)
        self.metrics = open(path, "a")
        self.board = self.wandb = None
        if logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(folder.path("tensorboard")))
        elif logger == "wandb":
            self.wandb = _wandb_run(folder.path("wandb"), config)

    def write(self, row: dict) -> None:
        """One logged step: {"step", "epoch", "loss", ...} as a JSON line (flushed at once, so
        a run that dies keeps what it logged) and for the logger."""
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        if self.board is not None:
            for key, value in scalars.items():
                self.board.add_scalar(f"train/{key}", value, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=row["step"])

    def close(self) -> None:
        self.metrics.close()
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_until(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass  # not ours to judge: kept as it was
        kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode())


def _wandb_run(root: Path, config: dict):
    """A W&B run in `root` that a resumed training run continues (its id is kept there);
    WANDB_PROJECT names the project (default fmkit), WANDB_MODE=offline keeps it local."""
    import wandb

    root.mkdir(exist_ok=True)
    id_file = root / "fmkit-run-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    if not id_file.exists():
        write_atomic(id_file, run_id.encode())
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "fmkit"),
        dir=str(root.parent),
        id=run_id,
        resume="allow",
        name=Path(config["output"]).name,
        config=config,
    )

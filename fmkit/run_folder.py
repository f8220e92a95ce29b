"""A training run's folder: what it may hold, how one written before folders were marked is
recognised, what it recorded of its settings, and the settings `fmkit train --resume` runs
with (the run's own; flags may change only what is marked resumable in TrainConfig)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from fmkit import checkpoint
from fmkit.config import BEFORE_KEY, TrainConfig, normalise, read_toml, resolve
from fmkit.errors import FmkitError
from fmkit.folders import Claim, FolderKind, claim, json_file

# The fields a resumed run may change (limits, intervals, logging, workers, where things are).
RESUMABLE = {f.name for f in fields(TrainConfig) if f.metadata.get("resumable")}


def claim_run(root: Path, resume: bool) -> Claim:
    """The run folder `root` for a new run, or for `--resume` one that holds checkpoints; each
    mistake (nothing to resume, an earlier run in the way) is one line, raised before any work."""
    folder = claim(root, RUN)
    saved = folder.ours and any(root.glob("checkpoint_*.safetensors"))
    if resume and not saved:
        where = "does not exist" if not root.exists() else "holds no checkpoint"
        raise FmkitError(
            f"--resume: {root} {where}, so there is nothing to continue; check --output, or "
            "drop --resume to start a new run"
        )
    if not resume and saved:  # never overwrite an earlier run's checkpoints by accident
        raise FmkitError(
            f"{root} already holds checkpoints; pass --resume to continue that run, or choose "
            "another --output"
        )
    return folder


def resumed_config(flags: dict[str, Any], given: set[str], toml: Path | None = None) -> TrainConfig:
    """The config of `fmkit train --output RUN --resume`: the run's own record (config.json, or
    its newest checkpoint's), with what the flags and the TOML file set that may safely change
    (the fields marked `resumable`). Setting any other key to another value is an error naming
    the key and both values. Without a record, `resolve`'s config (training then says there is
    nothing to resume)."""
    asked = normalise(read_toml(toml) if toml else {})
    output = flags["output"] if "output" in given else asked.get("output", flags["output"])
    record = run_record(Path(output))
    if record is None:
        return resolve(flags, given, toml)
    for name, value in normalise({n: v for n, v in flags.items() if n in given}).items():
        asked[name] = {**asked.get(name, {}), **value} if name.endswith("_opts") else value
    values = {**BEFORE_KEY, **normalise(record)}
    for name, value in asked.items():
        old = values.get(name)
        if name.endswith("_opts"):
            old = old or {}  # a record from before the kind had options
            for key, new in value.items():
                if key not in old or not _same(old[key], new):
                    flag = f"--{name[: -len('_opts')].replace('_', '-')}-opt"
                    was = f"{old[key]!r}" if key in old else "unset"
                    raise FmkitError(_changed(f"{flag} {key}", new, was, output))
            continue
        if name in RESUMABLE:
            values[name] = value
        elif not _same(old, value):
            raise FmkitError(_changed(f"--{name.replace('_', '-')}", value, repr(old), output))
    return TrainConfig.from_dict(values)


def _same(a: Any, b: Any) -> bool:
    """Equal as recorded: JSON turned tuples into lists and may hold 3e-4 as 0.0003."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b) and not isinstance(b, bool)
    return a == b or str(a) == str(b)


def _changed(flag: str, new: Any, old: str, output: str) -> str:
    return (
        f"--resume: {flag} {new!r} differs from the run's {old} ({output}); a resumed run keeps "
        "its settings: drop the flag, or train a new run with another --output"
    )


def run_record(root: Path) -> dict | None:
    """What run folder `root` recorded of its config: config.json, or (a run whose config.json
    is lost or unreadable) its newest checkpoint's; None when it has neither."""
    try:
        record = json.loads((root / "config.json").read_text())
        if isinstance(record, dict) and "backbone" in record:
            return record
    except (OSError, ValueError):
        pass
    try:
        latest = checkpoint.find_latest(root)
    except FmkitError:
        return None  # unreadable checkpoints: training's resume names each
    if latest is None:
        return None
    config = checkpoint.read_metadata(latest).get("config")
    return config if isinstance(config, dict) else None


def _records_training(root: Path) -> bool:
    """A training config.json, or checkpoints (a run whose config.json was lost)."""
    has_config = json_file("config.json", ("backbone", "dataset"))
    return any(root.glob("checkpoint_*.safetensors")) or has_config(root)


# A run folder; those written before folders were marked are recognised by their files.
RUN = FolderKind(
    "run",
    "a training run",
    "fmkit train",
    allowed=(
        "config.json", "metrics.jsonl", ".metrics.jsonl.*.tmp", "tensorboard", "wandb",
        "checkpoint_*.safetensors", ".checkpoint_*.tmp", "samples_*.png", "samples_*.txt",
        "final_samples_grid.*", "phema",
    ),
    recognise=_records_training,
)  # fmt: skip

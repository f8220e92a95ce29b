"""Checkpoints: one `.safetensors` file of tensors plus JSON metadata. Written atomically,
read without ever unpickling anything."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from fmkit.errors import FmkitError

SUFFIX = ".safetensors"


def save(path: Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write `tensors` and JSON-able `metadata` to `path` atomically.

    The bytes go to a temporary file in the same directory, are fsynced, and replace `path` in
    one rename: a crash or kill at any moment leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = save_bytes(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        metadata={"fmkit": json.dumps(metadata)},
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint: (tensors, metadata). Anything but a valid fmkit safetensors file is a
    clear error; pickle-based files (`torch.save`, `.pt`) are refused unread."""
    path = Path(path)
    if not path.is_file():
        raise FmkitError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise FmkitError(
            f"{path} is a pickle/torch.save file; fmkit only loads .safetensors checkpoints "
            "because unpickling can run arbitrary code"
        )
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        metadata = json.loads(header.get("__metadata__", {})["fmkit"])
        tensors = load_bytes(data)
    except Exception:
        raise FmkitError(
            f"{path} is not a readable fmkit checkpoint (corrupt or truncated)"
        ) from None
    return tensors, metadata


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint in `run_dir` with the highest step (newest file on ties)."""
    best, best_key = None, None
    for path in Path(run_dir).glob(f"checkpoint_*{SUFFIX}"):
        try:
            _, metadata = load(path)
        except FmkitError:
            continue  # a damaged file never hides a good one
        key = (metadata.get("step", -1), path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def resolve(checkpoint: Path) -> Path:
    """A checkpoint file, or a run directory meaning its newest checkpoint."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        latest = find_latest(checkpoint)
        if latest is None:
            raise FmkitError(f"no readable checkpoint_*{SUFFIX} in {checkpoint}")
        return latest
    return checkpoint


def pack_state(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unpack_state(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state as flat tensors plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: dict):
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})
    # Checkpoints store contiguous tensors; give each moment its parameter's strides back
    # (channels_last on a GPU), which fused AdamW requires.
    for param, entries in optimizer.state.items():
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                entries[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)

"""Checkpoints: one `.safetensors` file of tensors plus JSON metadata. Written atomically,
read without ever unpickling anything."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from fmkit.errors import FmkitError
from fmkit.folders import write_atomic

SUFFIX = ".safetensors"


def save(path: Path, tensors: dict[str, Tensor], metadata: dict) -> Path:
    """Write `tensors` and JSON-able `metadata` to `path` atomically (`folders.write_atomic`):
    a crash, a kill or a full disk at any moment leaves the previous file intact."""
    blob = save_bytes(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        metadata={"fmkit": json.dumps(metadata)},
    )
    return write_atomic(Path(path), blob)


_PICKLE = "a pickle/torch.save file"  # the short reason _inspect gives for one


def read_metadata(path: Path) -> dict:
    """The fmkit metadata of a checkpoint, read from its header alone (a few kilobytes of a
    file that can hold gigabytes of tensors). Raises FmkitError for anything but a complete
    fmkit safetensors file: pickles and zip archives (`torch.save`) are named as such."""
    path = Path(path)
    if not path.is_file():
        raise FmkitError(f"checkpoint {path} does not exist")
    metadata, reason = _inspect(path)
    if metadata is None:
        if reason == _PICKLE:
            raise FmkitError(
                f"{path} is {reason}; fmkit only loads .safetensors checkpoints because "
                "unpickling can run arbitrary code"
            )
        raise FmkitError(f"{path} is not a readable fmkit checkpoint ({reason})")
    return metadata


def _inspect(path: Path) -> tuple[dict | None, str]:
    """(metadata, "") for a complete fmkit checkpoint, else (None, short reason)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header, complete = _parse_header(f, head, size)
    if header is not None and not complete:
        return None, "corrupt or truncated"  # a safetensors header, but the data is cut short
    if header is None:
        # Not safetensors; only now is the first byte's meaning worth a guess.
        if head[:2] == b"PK" or head[:1] == b"\x80":
            return None, _PICKLE
        return None, "corrupt or truncated"
    try:
        return json.loads(header["__metadata__"]["fmkit"]), ""
    except (KeyError, TypeError, ValueError):
        return None, "a safetensors file without fmkit metadata"


def _parse_header(f, head: bytes, size: int) -> tuple[dict | None, bool]:
    """(the safetensors header, whether the file is complete) when `f` starts like a
    safetensors file of `size` bytes (8-byte little-endian length, then JSON), else
    (None, False). A safetensors file may begin with any byte, so this check comes before any
    guess from magic numbers."""
    if len(head) < 8:
        return None, False
    (length,) = struct.unpack("<Q", head)
    if length > size - 8 or length > 100 * 2**20:
        return None, False
    try:
        header = json.loads(f.read(length))
    except ValueError:
        return None, False
    if not isinstance(header, dict):
        return None, False
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    return header, 8 + length + max(ends, default=0) == size  # else truncated (or padded)


def load(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint: (tensors, metadata). Anything but a valid fmkit safetensors file is a
    clear error; pickle-based files (`torch.save`, `.pt`) are refused unread."""
    metadata = read_metadata(path)
    try:
        tensors = load_bytes(Path(path).read_bytes())
    except Exception:
        raise FmkitError(
            f"{path} is not a readable fmkit checkpoint (corrupt or truncated)"
        ) from None
    return tensors, metadata


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint in `run_dir` with the highest step (newest file on ties); None when the
    directory holds no checkpoint files. Only headers are read.

    A damaged file never hides a good one; but when there are checkpoint files and none of
    them can be read, that is an error naming them, never a silent fresh start.
    """
    best, best_key, unreadable = None, None, []
    for path in sorted(Path(run_dir).glob(f"checkpoint_*{SUFFIX}")):
        metadata, reason = _inspect(path)
        if metadata is None:
            unreadable.append(f"{path.name} ({reason})")
            continue
        key = (metadata.get("step", -1), path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    if best is None and unreadable:
        raise FmkitError(
            f"no readable checkpoint in {run_dir}: {'; '.join(unreadable)}; "
            "they were left untouched"
        )
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

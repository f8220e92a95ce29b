"""Running under torchrun: process-group set-up and teardown, and who writes what.

torchrun (single node or multi-node) sets RANK, LOCAL_RANK and WORLD_SIZE; fmkit reads them,
initialises NCCL on CUDA or gloo on the CPU, and wraps the model in DistributedDataParallel.
No launcher of our own: `torchrun --nproc-per-node 8 -m fmkit train ...`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmkit.errors import FmkitError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank
    local_rank: int = 0  # rank on this node (picks the GPU)
    world_size: int = 1  # processes in the job
    launched: bool = False  # started by torchrun (WORLD_SIZE set), even with one process
    local_world_size: int = 1  # processes on this node (they share its CPU cores)

    @property
    def enabled(self) -> bool:
        """Join a process group and wrap in DDP: under torchrun, one process included, so
        `torchrun --nproc-per-node 1` runs the same NCCL/DDP code as eight GPUs do."""
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """Rank, local rank and world size set by torchrun (a single process when unset)."""
    launched = "WORLD_SIZE" in os.environ
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise FmkitError("RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    return DistInfo(rank, local, world, launched, local_world)


def init(info: DistInfo, device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Join the process group (if the job has several processes); returns this rank's device.

    A rank that dies makes the others' collectives fail after `timeout_s` at the latest, instead
    of waiting forever.
    """
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    global _control
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        # Host-side agreements (has any rank been asked to stop?) go over a CPU group, so
        # asking never waits for the GPU's queued work.
        _control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return device


_control = None  # the CPU (gloo) group beside an NCCL one; None: the default group is gloo


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether `flag` is set on any rank (every rank calls it at the same point): a few bytes
    between hosts, no GPU synchronisation."""
    if not info.enabled:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


def shutdown(together: bool = False) -> None:
    """Leave the process group; safe to call when none was joined. `together` (after a run
    every rank completed): wait for every rank first, so no rank tears its group down while
    another is still at work (a gloo rank that left while rank 0 drew the final grid was seen
    to abort in the teardown). After an error a rank may be gone, so no waiting then."""
    global _control
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier(group=_control)  # host-side: the CPU group beside an NCCL one
        dist.destroy_process_group()
    _control = None


def all_min(value: int, info: DistInfo) -> int:
    """The smallest `value` over all ranks (e.g. "does every rank still have a batch?")."""
    if not info.enabled:
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag.item())


def maximum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The largest value of a tensor over all ranks."""
    if not info.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks (for logging)."""
    if not info.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / info.world_size


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and, on a GPU, the device's (dropout
    masks), so a resumed run replays the same draws."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `rng_state` returned (a checkpoint from the CPU has no CUDA state)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(info: DistInfo, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's `rng_state` (rank order), so resuming on N processes is exact."""
    state = rng_state(device)
    if not info.enabled:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states

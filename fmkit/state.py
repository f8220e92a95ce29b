"""Training state: what a checkpoint saves and a resume restores, in one object."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmkit import checkpoint, distributed
from fmkit.errors import FmkitError
from fmkit.phema import PowerEMA


class EMA:
    """Exponential moving average of a model's weights, with warm-up.

    Update n (from 0) uses decay min(target, n / (n + warmup)): the first update copies the
    weights, and until the target is reached the average is the power-function EMA of Karras
    et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models") with
    exponent warmup - 1, i.e. it weights step i by about (i / n)^(warmup - 1) and so always
    covers a fixed fraction of the run so far (about 1 / (warmup + 1) of it on average).
    warmup = 0 turns the ramp off (plain EMA at the target decay).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmup == 0:
            return self.decay
        return min(self.decay, self.updates / (self.updates + self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        if getattr(self, "_source", None) is not model:  # walk the modules once, not per step
            self._source = model
            self._pairs = (
                list(self.model.parameters()),
                [p.detach() for p in model.parameters()],
                list(zip(self.model.buffers(), model.buffers(), strict=True)),
            )
        ema, params, buffers = self._pairs
        torch._foreach_lerp_(ema, params, 1.0 - d)
        for b_ema, b in buffers:
            b_ema.copy_(b)
        self.updates += 1


@dataclass
class TrainState:
    """The model, its EMA, the optimizer and where the run is.

    Attributes:
        step: optimizer steps taken.
        epoch: the epoch in progress (epochs completed).
        batch_in_epoch: global batches of `epoch` already trained on.
    """

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    phema: PowerEMA | None = None  # post-hoc EMA profiles (fmkit.phema), when kept

    def average(self) -> None:
        """Fold the weights of the step just taken into the EMA (and the profiles)."""
        self.ema.update(self.model)
        if self.phema is not None:
            self.phema.update(self.model)

    def save(
        self,
        path: Path,
        metadata: dict,
        info: distributed.DistInfo,
        device: torch.device,
    ) -> Path:
        """Write a checkpoint (collective: every rank sends its RNG states; rank 0 writes).

        `metadata` is what describes the run (config, model spec, components); the counters,
        EMA updates, world size and optimizer groups are added here.
        """
        rng_states = distributed.gather_rng_states(info, device)
        if not info.is_main:
            return path
        tensors = {
            **checkpoint.pack_state("model", self.model.state_dict()),
            **checkpoint.pack_state("ema", self.ema.model.state_dict()),
            **{
                f"rng.{kind}.{rank}": state
                for rank, states in enumerate(rng_states)
                for kind, state in states.items()
            },
        }
        if self.phema is not None:
            tensors.update(checkpoint.pack_state("phema", self.phema.tensors()))
        optim_tensors, optim_groups = checkpoint.optimizer_tensors(self.optimizer)
        tensors.update(optim_tensors)
        meta = {
            **metadata,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "ema_updates": self.ema.updates,
            **({"phema_updates": self.phema.updates} if self.phema is not None else {}),
            "world_size": info.world_size,
            "optimizer": optim_groups,
        }
        return checkpoint.save(path, tensors, meta)

    def restore(self, path: Path, info: distributed.DistInfo, device: torch.device) -> str:
        """Load a checkpoint written by `save`; returns a note when the resume cannot be
        bit-exact (another number of processes), else ''."""
        tensors, meta = checkpoint.load(path)
        try:
            self.model.load_state_dict(checkpoint.unpack_state("model", tensors))
            self.ema.model.load_state_dict(checkpoint.unpack_state("ema", tensors))
        except RuntimeError:
            raise FmkitError(
                f"{path} holds a different architecture than the flags ask for"
            ) from None
        checkpoint.load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.step, self.epoch = meta["step"], meta["epoch"]
        self.batch_in_epoch = meta["batch_in_epoch"]
        self.ema.updates = meta["ema_updates"]
        if self.phema is not None:
            if "phema_updates" not in meta:
                raise FmkitError(f"{path} has no post-hoc EMA profiles; resume it with --phema off")
            self.phema.load(checkpoint.unpack_state("phema", tensors), meta["phema_updates"])
        saved_world = meta.get("world_size", 1)
        if saved_world != info.world_size:
            return (
                f"; it was written by {saved_world} process(es), this run has {info.world_size}: "
                "the data order is kept but dropout differs, so it is not bit-exact"
            )
        states = {}
        for kind in ("torch", "cuda"):
            key = f"rng.{kind}.{info.rank}"
            if key in tensors:
                states[kind] = tensors[key]
        distributed.set_rng_state(states, device)
        return ""

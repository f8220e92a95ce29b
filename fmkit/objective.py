"""Training objectives: the interface plugins implement, and the seeded draws they make.

An objective turns a batch into a loss and says how its model is sampled. The training loop
never knows which objective it runs (as in EDM's injected `loss_fn`): flow matching is the
built-in default; reflow, MeanFlow, OT coupling and guidance dropout are objectives too.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fmkit.batch import Batch, Cond, call_model
from fmkit.errors import FmkitError
from fmkit.sampling import Sampling
from fmkit.solver import Solution, Solver, Velocity, integrate

# A backbone as objectives see it: model(x, t, cond) -> (B, C, H, W); cond may be None.
Model = Callable[[Tensor, Tensor, Cond | None], Tensor]


@dataclass
class Loss:
    """What one objective call returns.

    Attributes:
        value: scalar to minimise (the mean over this micro-batch).
        logs: extra scalars for metrics.jsonl (detached), e.g. {"loss_t_low": ...}; the same
            keys on every call (ranks average them together).
    """

    value: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Draws:
    """The random numbers of one training step, for this process's rows of the global batch.

    Each call draws for the whole global batch from a generator seeded by (seed, step, stream,
    call number) and returns this micro-batch's rows. So sample i of a step gets the same noise,
    time or flip whether the global batch runs on one process or eight, with or without
    gradient accumulation, and a resumed run replays the same numbers.

    Args:
        seed, step: the run's seed and the optimizer step.
        global_batch: B, images per optimizer step over all processes.
        rows: this micro-batch's slice of the global batch.
        device: where to draw (a GPU draws its own; no copy from the CPU).
        stream: separates independent users of one step (augmentation, objective).
    """

    def __init__(
        self,
        seed: int,
        step: int,
        global_batch: int,
        rows: slice,
        device: torch.device | str = "cpu",
        stream: str = "objective",
    ) -> None:
        self.seed, self.step, self.stream = seed, step, stream
        self.global_batch, self.rows, self.device = global_batch, rows, torch.device(device)
        self.calls = 0

    def generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator for the next draw (also for objectives that draw by themselves),
        on `device` (default: the draws' device)."""
        key = f"{self.seed}:{self.step}:{self.stream}:{self.calls}".encode()
        self.calls += 1
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def normal(self, *shape: int) -> Tensor:
        """(n, *shape) standard normal values for this micro-batch's n samples."""
        return self.normal_all(*shape)[self.rows]

    def normal_all(self, *shape: int) -> Tensor:
        """(B, *shape) the same draw for the whole global batch (couplings that look at other
        samples' noise; `group_rows` says which rows each process holds)."""
        return torch.randn(
            (self.global_batch, *shape), generator=self.generator(), device=self.device
        )

    def group_rows(self) -> list[slice]:
        """The rows of this micro-batch on every process, in rank order (under torchrun each
        rank holds a contiguous B / world share of the global batch, see EpochSampler; just
        this micro-batch's rows without torchrun)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [self.rows]
        world, rank = dist.get_world_size(), dist.get_rank()
        local = self.global_batch // world
        return [
            slice(self.rows.start + (r - rank) * local, self.rows.stop + (r - rank) * local)
            for r in range(world)
        ]

    def uniform(self, *shape: int) -> Tensor:
        """(n, *shape) values uniform in [0, 1) for this micro-batch's n samples."""
        full = torch.rand(
            (self.global_batch, *shape), generator=self.generator(), device=self.device
        )
        return full[self.rows]


def check_dropout(cond_dropout: float, attribute_dropout: float) -> None:
    """Condition dropout rates an objective takes: each in [0, 1) (ValueError otherwise; a
    rate of 1 would never train the conditional model)."""
    for name, rate in (("cond_dropout", cond_dropout), ("attribute_dropout", attribute_dropout)):
        if not 0 <= rate < 1:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")


def drop_conditions(
    cond: Cond | None, draws: Draws, sample_rate: float, attribute_rate: float = 0.0
) -> Cond | None:
    """Conditions left out at random, so one model learns the conditional and unconditional
    velocities that classifier-free guidance combines (Ho & Salimans 2022, "Classifier-Free
    Diffusion Guidance").

    Each sample's whole condition is dropped with probability `sample_rate`; a kind with
    parts (attributes) also drops each remaining part with probability `attribute_rate`, so any
    subset can be left unspecified at sampling time. Dropped entries become the kind's
    unspecified values (`ConditionKind.drop`). The second time "r" of few-step objectives is
    never dropped.
    """
    from fmkit.conditions import condition_keys, condition_kind

    if cond is None or (sample_rate <= 0 and attribute_rate <= 0):
        return cond
    out = dict(cond)
    whole = draws.uniform() < sample_rate  # (n,)
    for key in condition_keys(cond):
        out[key] = condition_kind(key).drop(cond[key], whole, draws, attribute_rate)
    return out


class Objective(ABC):
    """A training objective (see the module docstring)."""

    #: Boolean backbone options the objective needs switched on (MeanFlow: `two_times`, a
    #: second time input). Training sets them in the backbone's options; a backbone whose
    #: factory lacks one cannot train the objective (see `backbone_options`).
    backbone_needs: tuple[str, ...] = ()

    @abstractmethod
    def loss(self, model: Model, batch: Batch, draws: Draws) -> Loss:
        """The loss of one micro-batch.

        Args:
            model: the backbone, called as model(x, t, cond).
            batch: images (B, C, H, W) in [-1, 1] and their conditions.
            draws: this step's seeded random numbers (use them, not the global RNG).
        """

    def sampling(self) -> Sampling:
        """How a model trained with this objective samples unless asked otherwise (saved with
        it): by default the flow-matching choice, `fmkit.sampling.Sampling()`."""
        return Sampling()

    def velocity(self, model: Model, cond: Cond | None = None) -> Velocity:
        """The ODE right-hand side velocity(t, x) that sampling integrates: by default the
        model's output is the velocity, t 0-dim and x (B, C, H, W)."""

        def field(t: Tensor, x: Tensor) -> Tensor:
            return model(x, t.to(x.dtype).expand(x.shape[0]), cond)

        return field

    def generate(
        self,
        model: Model,
        noise: Tensor,
        solver: Solver,
        cond: Cond | None = None,
        times: Tensor | None = None,
    ) -> Solution:
        """Samples from `noise` (B, C, H, W) at t = 0 to data at t = 1, with the states at
        `times` (default [0, 1]); objectives with another sampler override this."""
        if times is None:
            times = torch.tensor([0.0, 1.0])
        times = times.to(noise.device, noise.dtype)
        return integrate(solver, self.velocity(model, cond), noise, times)


def backbone_options(objective: Objective, name: str, backbone: str, options: dict) -> dict:
    """The backbone's options with what `objective` (registered as `name`) needs switched on;
    a backbone without such an option, or one set to false, is an error."""
    from fmkit.options import conform
    from fmkit.plugins import registry

    options = dict(options)
    for need in objective.backbone_needs:
        if not registry("backbones").accepts(backbone, need):
            raise FmkitError(
                f"objective '{name}' needs a backbone with the option {need}, and backbone "
                f"'{backbone}' has none"
            )
        try:
            wanted = conform(options.get(need, True), bool)
        except TypeError:
            wanted = False
        if not wanted:
            raise FmkitError(f"objective '{name}' needs --backbone-opt {need}=true")
        options[need] = True
    return options


def as_model(module: torch.nn.Module) -> Model:
    """A backbone module as objectives call it: model(x, t, cond)."""

    def model(x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        return call_model(module, x, t, cond)

    return model

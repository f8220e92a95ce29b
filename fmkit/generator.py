"""The Generator: a model spec and its weights, with no training state. Every sampler uses it:
`fmkit sample`, `fmkit eval`, the training grids, the benchmarks and exports. Its folder form
is described in fmkit.spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from fmkit import checkpoint
from fmkit.batch import Cond, DataSpec, call_model
from fmkit.compiled import FirstCompiledCall
from fmkit.conditions import encode_conditions
from fmkit.device import choose
from fmkit.errors import FmkitError
from fmkit.folders import claim, write_atomic, write_json
from fmkit.guidance import GuidedModel
from fmkit.hub import locate
from fmkit.objective import Objective, as_model
from fmkit.sampling import Sampling
from fmkit.solver import Solution, Solver
from fmkit.space import Space
from fmkit.spec import (  # noqa: F401 (the names this module has always offered)
    CONFIG,
    FORMAT,
    MODEL_FOLDER,
    WEIGHTS,
    ModelSpec,
    build_backbone,
    build_objective,
    is_model_folder,
    read_spec,
    sampling_of,
)


@dataclass
class Samples:
    """Generated images.

    Attributes:
        images: (N, C, H, W) float in [-1, 1] (roughly), on the CPU.
        nfe: network evaluations of each batch.
        seconds: wall time of the generation.
        trajectory: (K, B, C, H, W) states of the first batch at the requested times (a
            jumping sampler's: after each jump), or None.
        trajectory_times: (K,) their times, or None.
    """

    images: Tensor
    nfe: list[int]
    seconds: float
    trajectory: Tensor | None = None
    trajectory_times: Tensor | None = None


class Generator:
    """A trained model ready to sample.

    Args:
        spec: what the model is.
        module: the backbone with its weights.
        device: where to run it.
    """

    def __init__(
        self, spec: ModelSpec, module: nn.Module, device: torch.device | str | None = None
    ) -> None:
        self.spec = spec
        self.module = module if device is None else module.to(device)
        self.objective: Objective = build_objective(spec)
        #: how it samples unless asked otherwise (saved with the model; its objective's choice)
        self.defaults: Sampling = sampling_of(spec, self.objective)
        #: where it generates: `generate` works there, `batches` and `sample` give images
        self.space: Space = spec.build_space()
        self.accelerate()

    def accelerate(self, precision: str = "auto", compile: bool = False) -> Generator:
        """How `generate` runs the network; returns self.

        Args:
            precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16". Only
                the network's evaluations change: the solver's state and arithmetic stay fp32.
            compile: torch.compile the network (worth its warm-up when many batches follow,
                e.g. an FID over 50,000 samples); if the compiler fails on the first
                evaluation, sampling goes on eagerly after one warning line.
        """
        self.precision = precision
        self.network = torch.compile(self.module) if compile else self.module

        def fall_back() -> None:
            self.network = self.module

        self.first_call = FirstCompiledCall(
            compile, fall_back, what="network evaluation", then="sampling without it"
        )
        return self

    # Building.

    @classmethod
    def load(
        cls, source: str | Path, ema: bool = True, device: torch.device | str = "cpu"
    ) -> Generator:
        """From a weights folder (`save_pretrained`, or a Hugging Face Hub repo id of one:
        "org/name"), a checkpoint file, or a run directory (its newest checkpoint)."""
        source = locate(source)
        if is_model_folder(source):
            return cls.from_pretrained(source, device)
        return cls.from_checkpoint(source, ema=ema, device=device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, ema: bool = True, device: torch.device | str = "cpu"
    ) -> Generator:
        """The EMA (or, with ema=False, the raw) weights of a training checkpoint."""
        path = checkpoint.resolve(Path(path))
        tensors, meta = checkpoint.load(path)
        spec = ModelSpec.from_checkpoint_meta(meta)
        module = build_backbone(spec, source=str(path))
        _load_weights(module, checkpoint.unpack_state("ema" if ema else "model", tensors), path)
        return cls(spec, module.eval(), device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> Generator:
        """Read what `save_pretrained` wrote, from a folder or a Hugging Face Hub repo id
        ("org/name", "org/name@revision"; see fmkit.hub): no training state is read."""
        folder = locate(folder)
        try:
            config = json.loads((folder / CONFIG).read_text())
            if config.get("format") != FORMAT:
                raise ValueError
            spec = ModelSpec.from_dict(config["model"])
        except (OSError, ValueError, KeyError, TypeError):
            raise FmkitError(
                f"{folder} is not an fmkit model folder ({CONFIG} unreadable)"
            ) from None
        try:
            weights = load_file(folder / WEIGHTS)
        except Exception:
            raise FmkitError(f"{folder / WEIGHTS} is missing or not a safetensors file") from None
        module = build_backbone(spec, source=str(folder))
        _load_weights(module, {k: v.float() for k, v in weights.items()}, folder)
        return cls(spec, module.eval(), device)

    def save_pretrained(self, folder: str | Path, fp16: bool = False) -> Path:
        """Write config.json and model.safetensors (fp16 halves the file) into `folder`;
        returns the folder. An earlier model folder there is replaced; any other non-empty
        folder is refused before anything is written."""
        owned = claim(folder, MODEL_FOLDER)
        owned.write_staged(lambda staging: self.write_folder(staging, fp16))  # whole, or not
        return Path(folder)

    def write_folder(self, folder: Path, fp16: bool = False) -> None:
        """config.json and model.safetensors into `folder` (`save_pretrained` without the
        claim: for exporters, which write into a staging folder)."""
        from fmkit import __version__

        dtype = torch.float16 if fp16 else None
        weights = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            .detach()
            .contiguous()
            .cpu()
            for k, v in self.module.state_dict().items()
        }
        config = {
            "format": FORMAT,
            "format_version": 1,
            "model": {**self.spec.to_dict(), "sampling": self.defaults.to_dict()},
            "dtype": "float16" if fp16 else "float32",
            "fmkit_version": __version__,
        }
        write_atomic(Path(folder) / WEIGHTS, safetensors_bytes(weights))
        write_json(Path(folder) / CONFIG, config)

    def weights_digest(self) -> str:
        """A SHA-256 of the weights (names, dtypes, shapes and values): what identifies the
        model whatever file or folder it was read from (reflow pair folders record it)."""
        digest = hashlib.sha256()
        for name, value in sorted(self.module.state_dict().items()):
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # Sampling.

    @property
    def device(self) -> torch.device:
        first = next(self.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def data(self) -> DataSpec:
        return self.spec.data

    def velocity(self, cond: Cond | None = None):
        """The ODE right-hand side velocity(t, x) (for likelihoods and custom solvers)."""
        return self.objective.velocity(as_model(self.module), cond)

    @torch.no_grad()
    def generate(
        self,
        noise: Tensor,
        solver: Solver,
        cond: Cond | None = None,
        times: Tensor | None = None,
        guidance: float | None = None,
        interval: tuple[float, float] | None = None,
        watch: Callable[[int], None] | None = None,
    ) -> Solution:
        """Integrate from given `noise` (B, c, h, w), in the model's space (`space.encode`
        of image-shaped noise); states at `times` (default [0, 1]), in that space too.

        `cond` is in fmkit.batch's form (see `encode`); `guidance` and `interval` as in
        GuidedModel (default: the model's). The NFE counts every network evaluation, guidance's
        second pass included; `watch` hears the running count after each.
        """
        guidance = self.defaults.guidance if guidance is None else guidance
        interval = self.defaults.guidance_interval if interval is None else interval
        model = GuidedModel(self._evaluate, guidance, interval, watch)
        solution = self.objective.generate(model, noise.to(self.device), solver, cond, times)
        solution.nfe = model.nfe
        return solution

    @property
    def bf16(self) -> bool:
        """Whether `generate` evaluates the network in bf16 here (see `accelerate`)."""
        return choose(self.device, self.precision, False, False).bf16

    def _evaluate(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """One network evaluation as `generate` makes it: in `precision`, returned in x's."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            v = self.first_call.run(lambda: call_model(self.network, x, t, cond))
        return v.to(x.dtype)

    def encode(self, cond: Any, n: int) -> Cond | None:
        """User conditions ({"Smiling": 1}, {"class": "cat"}, a list of those, or tensors) as
        the model's tensors; see `encode_conditions`."""
        return encode_conditions(self.data.condition, cond, n)

    def batches(
        self,
        num_samples: int,
        *,
        solver: Solver | None = None,
        batch_size: int = 64,
        seed: int = 0,
        cond: Any = None,
        trajectory: int = 0,
        guidance: float | None = None,
        interval: tuple[float, float] | None = None,
        watch: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[Tensor, Solution]]:
        """Generate in batches: yields (images on the CPU, Solution) per batch.

        Noise comes from a CPU generator seeded by `seed`, drawn batch after batch, so the same
        seed gives the same images on any device. `solver` (default: the model's), `cond` (see
        `encode`), `guidance` and `interval` (default: the model's). `trajectory` = K >= 2 also
        keeps K states of the first batch. `watch` hears each batch's running NFE.
        """
        solver = solver or self.defaults.solver_for().solver
        cond = self.encode(cond, num_samples)
        was_training = self.module.training
        self.module.eval()
        generator = torch.Generator().manual_seed(seed)
        shape = (self.data.channels, self.data.image_size, self.data.image_size)
        try:
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                noise = self.space.noise(n, *shape[:2], generator)
                rows = (
                    None
                    if cond is None
                    else {k: v[start : start + n].to(self.device) for k, v in cond.items()}
                )
                times = torch.linspace(0, 1, trajectory) if trajectory >= 2 and start == 0 else None
                solution = self.generate(noise, solver, rows, times, guidance, interval, watch)
                yield self.space.decode(solution.x.float()).cpu(), solution
        finally:
            self.module.train(was_training)

    def sample(
        self,
        num_samples: int,
        cond: Any = None,
        solver: str | Solver | None = None,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        solver_options: dict | None = None,
        trajectory: int = 0,
        guidance: float | None = None,
        interval: tuple[float, float] | None = None,
        progress: Callable[[Tensor, Solution], None] | None = None,
        convert: Callable[[Tensor], Tensor] | None = None,
        watch: Callable[[int], None] | None = None,
    ) -> Samples:
        """`num_samples` images from noise seeded by `seed`, with NFE and timing.

        Args:
            cond: what to generate: what the model's condition kind takes for every sample
                ({"class": "cat"}, {"Smiling": 1, "Eyeglasses": 1}), a list of such dicts
                (one per sample), or tensors in fmkit.batch's form; None for unconditional.
            solver: a registered solver's name (with `steps` / `solver_options`) or a Solver;
                unset, the model's (`defaults`), as are unset steps.
            trajectory: K >= 2 keeps K states of the first batch, from noise to image.
            guidance: classifier-free guidance weight w (1: none); `interval` limits it to
                times lo <= t <= hi (unset: the model's).
            progress: called with each batch's images and Solution as it is done; `watch`,
                with the batch's running NFE after every network evaluation.
            convert: applied to each batch's images before they are kept (`fmkit.pixels.
                to_uint8` keeps a quarter of the memory: 50,000 evaluation samples).
        """
        if not isinstance(solver, Solver):
            solver = self.defaults.solver_for(solver, steps, solver_options).solver
        start = time.perf_counter()
        images, nfe, kept, kept_times = [], [], None, None
        for x, solution in self.batches(
            num_samples, solver=solver, batch_size=batch_size, seed=seed, cond=cond,
            trajectory=trajectory, guidance=guidance, interval=interval, watch=watch,
        ):  # fmt: skip
            images.append(x if convert is None else convert(x))
            nfe.append(solution.nfe)
            if progress is not None:
                progress(x, solution)
            if kept is None and trajectory >= 2:
                states = solution.trajectory.float()  # (K, B, c, h, w) in the model's space
                kept = torch.stack([self.space.decode(state) for state in states]).cpu()
                kept_times = torch.linspace(0, 1, len(kept), dtype=torch.float64)
                if solution.times is not None:  # e.g. MeanFlow's jumps, whatever was asked
                    kept_times = solution.times.double().cpu()
        return Samples(torch.cat(images), nfe, time.perf_counter() - start, kept, kept_times)


def _load_weights(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise FmkitError(
            f"{source} holds weights of a different architecture than its spec describes"
        ) from None


def init_from(
    model: nn.Module, spec: ModelSpec, source: str | Path, needs: Sequence[str] = ()
) -> None:
    """Load the EMA weights of `source` (`fmkit train --init-from`) into `model`, built for
    `spec`. The two may differ only in the boolean backbone options in `needs` (what the
    objective needs switched on, `Objective.backbone_needs`: MeanFlow's second time): the
    weights those add keep their own initialisation, which for the built-in UNet leaves the
    teacher's velocity unchanged (its r-path starts at zero)."""
    teacher = Generator.load(source)
    needs = set(needs)
    own = {k: v for k, v in spec.backbone_opts.items() if k not in needs}
    theirs = {k: v for k, v in teacher.spec.backbone_opts.items() if k not in needs}
    mismatch = ["backbone"] if teacher.spec.backbone != spec.backbone else []
    if json.loads(json.dumps(own)) != json.loads(json.dumps(theirs)):  # tuples as lists
        mismatch.append("backbone_opts")
    if teacher.spec.data != spec.data:
        mismatch.append("data (resolution, channels or conditions)")
    if (teacher.spec.space, teacher.spec.model_shape()) != (spec.space, spec.model_shape()):
        mismatch.append(f"space ({teacher.spec.space}, not {spec.space})")
    if mismatch:
        raise FmkitError(
            f"--init-from {source}: its model differs from this run's in "
            f"{', '.join(mismatch)}; it was {teacher.spec.backbone} {teacher.spec.backbone_opts} "
            f"for {teacher.spec.data.to_dict()}"
        )
    missing, unexpected = model.load_state_dict(teacher.module.state_dict(), strict=False)
    # Only weights that the needs add may be missing: those a model without them lacks.
    plain_opts = {**own, **{k: v for k, v in teacher.spec.backbone_opts.items() if k in needs}}
    plain = build_backbone(dataclasses.replace(spec, backbone_opts=plain_opts))
    added = set(model.state_dict()) - set(plain.state_dict())
    if unexpected or set(missing) - added:
        raise FmkitError(
            f"--init-from {source}: its weights do not fit this model "
            f"({(list(unexpected) or sorted(set(missing) - added))[0]})"
        )

"""The Generator: a model spec and its weights, with no training state. Every sampler uses it:
`fmkit sample`, `fmkit eval`, the training grids, the benchmarks and exports.

Its folder form (`save_pretrained` / `from_pretrained`, as diffusers' models do):

    config.json        {"format": "fmkit-generator", "format_version": 1, "model": ModelSpec
                        (backbone, data, objective, path, their options and the plugins that
                        provide them), "dtype": "float32" | "float16", "fmkit_version": ...}
    model.safetensors  the backbone's weights (the EMA weights of a run), fp32 or fp16
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from fmkit import checkpoint
from fmkit.batch import Cond, DataSpec, call_model
from fmkit.conditions import condition_keys, encode_conditions, unconditional
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, json_file, write_atomic, write_json
from fmkit.objective import Objective, as_model
from fmkit.solver import Solution, Solver, build_solver

CONFIG, WEIGHTS = "config.json", "model.safetensors"
# Classifier-free guidance of conditional models unless asked otherwise: weight 1.5 at times
# 0.2 <= t <= 0.8 made 98% of digits the requested class at a Fréchet distance below the
# unconditional model's (benchmarks/conditional.py; docs/benchmarks.md). Unconditional models
# are never guided.
GUIDANCE, GUIDANCE_INTERVAL = 1.5, (0.2, 0.8)
GUIDANCE_MAX = 100.0  # far beyond any useful weight; infinities would make NaN images
# Sampling unless asked otherwise: Adams-Bashforth 2 on the shift schedule came within 1% of
# dopri5 (200 NFE) at 20 steps, and within 1% at 8, on the quality benchmark (benchmarks.md,
# "Without mirrored digits" and "Few-step generation").
SAMPLE_SOLVER, SAMPLE_STEPS = "ab2", 20
FORMAT = "fmkit-generator"


@dataclass
class ModelSpec:
    """Everything that rebuilds a trained model, and nothing about how it was trained.

    Attributes:
        backbone, backbone_opts: the registered backbone and its options.
        data: what the model generates (channels, resolution, conditions).
        objective, objective_opts: the objective, which says how the model is sampled.
        path, path_opts: the probability path the objective uses.
        components: which plugin, distribution and version provided each component.
    """

    backbone: str
    backbone_opts: dict
    data: DataSpec
    objective: str = "flow_matching"
    objective_opts: dict = field(default_factory=dict)
    path: str = "linear"
    path_opts: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "backbone_opts": self.backbone_opts,
            "data": self.data.to_dict(),
            "objective": self.objective,
            "objective_opts": self.objective_opts,
            "path": self.path,
            "path_opts": self.path_opts,
            "components": self.components,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{**data, "data": DataSpec.from_dict(data["data"])})

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> ModelSpec:
        """The spec a checkpoint records; checkpoints written before specs existed (fmkit
        0.1.0 up to this format) are read from their training config."""
        if "model" in meta:
            return cls.from_dict(meta["model"])
        config = meta.get("config")
        if not isinstance(config, dict) or "backbone" not in config:
            raise FmkitError(
                "this checkpoint records neither a model spec nor a training config; it was "
                f"not written by fmkit (metadata version {meta.get('fmkit_version', 'unknown')})"
            )
        return cls(
            backbone=config["backbone"],
            backbone_opts=config.get("backbone_opts", {}),
            data=DataSpec(config.get("channels", 3), config.get("image_size", 64)),
            path=config.get("path", "linear"),
            path_opts=config.get("path_opts", {}),
            components=meta.get("components", {}),
        )


def read_spec(source: str | Path) -> ModelSpec:
    """The ModelSpec of a model folder, checkpoint or run directory, without its weights."""
    source = Path(source)
    if is_model_folder(source):
        try:
            return ModelSpec.from_dict(json.loads((source / CONFIG).read_text())["model"])
        except (OSError, ValueError, KeyError, TypeError):
            raise FmkitError(
                f"{source} is not an fmkit model folder ({CONFIG} unreadable)"
            ) from None
    if not source.exists():
        raise FmkitError(
            f"{source} does not exist (expected a run directory, checkpoint or model folder)"
        )
    return ModelSpec.from_checkpoint_meta(checkpoint.read_metadata(checkpoint.resolve(source)))


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

    # Building.

    @classmethod
    def load(
        cls, source: str | Path, ema: bool = True, device: torch.device | str = "cpu"
    ) -> Generator:
        """From a weights folder (`save_pretrained`), a checkpoint file, or a run directory
        (its newest checkpoint)."""
        source = Path(source)
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
        """Read what `save_pretrained` wrote: no training state is needed or read."""
        folder = Path(folder)
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
        from fmkit import __version__

        owned = claim(folder, MODEL_FOLDER)
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
            "model": self.spec.to_dict(),
            "dtype": "float16" if fp16 else "float32",
            "fmkit_version": __version__,
        }

        def write(staging: Path) -> None:
            write_atomic(staging / WEIGHTS, safetensors_bytes(weights))
            write_json(staging / CONFIG, config)

        owned.write_staged(write)  # in place whole, or (a full disk) not at all
        return Path(folder)

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
        guidance: float = GUIDANCE,
        interval: tuple[float, float] = GUIDANCE_INTERVAL,
    ) -> Solution:
        """Integrate from given `noise` (B, C, H, W); states at `times` (default [0, 1]).

        `cond` is in fmkit.batch's form (see `encode`); `guidance` and `interval` as in
        GuidedModel. The NFE counts every network evaluation, guidance's second pass included.
        """
        model = GuidedModel(self.module, guidance, interval)
        solution = self.objective.generate(model, noise.to(self.device), solver, cond, times)
        solution.nfe = model.nfe
        return solution

    def encode(self, cond: Any, n: int) -> Cond | None:
        """User conditions ({"Smiling": 1}, {"class": "cat"}, a list of those, or tensors) as
        the model's tensors; see `encode_conditions`."""
        return encode_conditions(self.data.condition, cond, n)

    def batches(
        self,
        num_samples: int,
        *,
        solver: Solver,
        batch_size: int = 64,
        seed: int = 0,
        cond: Any = None,
        trajectory: int = 0,
        guidance: float = GUIDANCE,
        interval: tuple[float, float] = GUIDANCE_INTERVAL,
    ) -> Iterator[tuple[Tensor, Solution]]:
        """Generate in batches: yields (images on the CPU, Solution) per batch.

        Noise comes from a CPU generator seeded by `seed`, drawn batch after batch, so the same
        seed gives the same images on any device. `cond`: see `encode`. `trajectory` = K >= 2
        also keeps K states of the first batch.
        """
        cond = self.encode(cond, num_samples)
        was_training = self.module.training
        self.module.eval()
        generator = torch.Generator().manual_seed(seed)
        shape = (self.data.channels, self.data.image_size, self.data.image_size)
        try:
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                noise = torch.randn(n, *shape, generator=generator)
                rows = (
                    None
                    if cond is None
                    else {k: v[start : start + n].to(self.device) for k, v in cond.items()}
                )
                times = torch.linspace(0, 1, trajectory) if trajectory >= 2 and start == 0 else None
                solution = self.generate(noise, solver, rows, times, guidance, interval)
                yield solution.x.float().cpu(), solution
        finally:
            self.module.train(was_training)

    def sample(
        self,
        num_samples: int,
        cond: Any = None,
        solver: str | Solver = SAMPLE_SOLVER,
        steps: int | None = SAMPLE_STEPS,
        seed: int = 0,
        batch_size: int = 64,
        solver_options: dict | None = None,
        trajectory: int = 0,
        guidance: float = GUIDANCE,
        interval: tuple[float, float] = GUIDANCE_INTERVAL,
    ) -> Samples:
        """`num_samples` images from noise seeded by `seed`, with NFE and timing.

        Args:
            cond: what to generate: {"Smiling": 1, "Eyeglasses": 1} (attributes left out are
                unspecified), {"class": "cat"}, a list of such dicts (one per sample), or
                tensors in fmkit.batch's form; None for unconditional samples.
            solver: a registered solver's name (with `steps` / `solver_options`) or a Solver.
            trajectory: K >= 2 keeps K states of the first batch, from noise to image.
            guidance: classifier-free guidance weight w (1: none); `interval` limits it to
                times lo <= t <= hi.
        """
        if isinstance(solver, str):
            solver = build_solver(solver, steps=steps, options=solver_options)
        start = time.perf_counter()
        images, nfe, kept, kept_times = [], [], None, None
        for x, solution in self.batches(
            num_samples, solver=solver, batch_size=batch_size, seed=seed, cond=cond,
            trajectory=trajectory, guidance=guidance, interval=interval,
        ):  # fmt: skip
            images.append(x)
            nfe.append(solution.nfe)
            if kept is None and trajectory >= 2:
                kept = solution.trajectory.float().cpu()
                kept_times = torch.linspace(0, 1, len(kept), dtype=torch.float64)
                if solution.times is not None:  # e.g. MeanFlow's jumps, whatever was asked
                    kept_times = solution.times.double().cpu()
        return Samples(torch.cat(images), nfe, time.perf_counter() - start, kept, kept_times)


class GuidedModel:
    """A backbone as objectives call it, model(x, t, cond), with classifier-free guidance
    (Ho & Salimans 2022), and a count of network evaluations.

    With guidance w, the output is v_u + w (v_c - v_u): v_c given the conditions, v_u with
    every condition unspecified, both from one batched forward pass (counted as 2 NFE). w = 1
    is the conditional model alone, w = 0 the unconditional one (1 NFE each). Guidance can be
    limited to times in `interval` (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality"); outside it the model is conditional.
    """

    def __init__(
        self, module: nn.Module, guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        self.module, self.guidance, self.interval = module, guidance, interval
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        w = self.guidance
        # Guidance needs a condition to leave out: a second time "r" alone is not one.
        if cond is None or w == 1.0 or not condition_keys(cond) or not self._inside(t):
            self.nfe += 1
            return call_model(self.module, x, t, cond)
        free = unconditional(cond)
        if w == 0.0:
            self.nfe += 1
            return call_model(self.module, x, t, free)
        both = {k: torch.cat([cond[k], free[k]]) for k in cond}
        v_c, v_u = call_model(self.module, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        self.nfe += 2
        return v_u + w * (v_c - v_u)

    def _inside(self, t: Tensor) -> bool:
        lo, hi = self.interval
        if lo <= 0.0 and hi >= 1.0:
            return True
        now = float(t.reshape(-1)[0])  # one time for the whole batch during a solve
        return lo - 1e-6 <= now <= hi + 1e-6  # a grid point on the edge (in float32) is inside


# A model folder; those written before folders were marked are recognised by their config.
MODEL_FOLDER = FolderKind(
    "model",
    "an fmkit model folder",
    "fmkit export",
    signature=(CONFIG, WEIGHTS),
    allowed=(CONFIG, WEIGHTS),
    recognise=json_file(CONFIG, format=FORMAT),
)


def is_model_folder(path: Path) -> bool:
    """Whether `path` is a folder `save_pretrained` wrote (a run directory has a config.json
    too, but it describes training, and no model.safetensors)."""
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def build_backbone(spec: ModelSpec, source: str | None = None) -> nn.Module:
    """The backbone `spec` names, built for its data (image size, channels, conditions)."""
    from fmkit.plugins import registry

    backbones = registry("backbones")
    if spec.backbone not in backbones and source is not None:
        origin = spec.components.get("backbone", {})
        dist = origin.get("distribution", "unknown")
        raise FmkitError(
            f"{source} needs backbone '{spec.backbone}', which is not installed; it came from the "
            f"distribution {dist} {origin.get('version', '')}".rstrip()
            + f": pip install {dist}"
        )
    conditional = spec.data.condition.kind != "none"
    if conditional and not backbones.accepts(spec.backbone, "data"):
        raise FmkitError(
            f"backbone '{spec.backbone}' takes no conditions (its factory has no `data` "
            f"parameter), but the data is conditioned on {spec.data.condition.kind}"
        )
    return backbones.build(
        spec.backbone,
        spec.backbone_opts,
        image_size=spec.data.image_size,
        channels=spec.data.channels,
        data=spec.data,
    )


def build_objective(spec: ModelSpec) -> Objective:
    from fmkit.plugins import registry

    path = registry("paths").build(spec.path, spec.path_opts)
    return registry("objectives").build(spec.objective, spec.objective_opts, path=path)


def _load_weights(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError:
        raise FmkitError(
            f"{source} holds weights of a different architecture than its spec describes"
        ) from None

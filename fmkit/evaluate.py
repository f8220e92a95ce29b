"""`fmkit eval fid` and `sweep`: a model sampled as the field evaluates it (a conditional one
with conditions drawn from the data, guided), scored with the metrics asked for (a plugin
kind, fmkit.metrics) against reference statistics (fmkit.reference) of Inception features
(fmkit.inception); the JSON record of each evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fmkit import checkpoint as checkpoint_module
from fmkit.collate import cond_from_labels
from fmkit.conditions import condition_kind
from fmkit.data import build_dataset
from fmkit.errors import FmkitError
from fmkit.generator import Generator, is_model_folder
from fmkit.inception import (
    BACKEND_MODE,
    RESIZE,
    Inception,
    backend_name,
    inception_features,
    load_inception,
)
from fmkit.metrics import FEATURES, Metric
from fmkit.options import format_options
from fmkit.pixels import to_uint8
from fmkit.progress import SamplingBar
from fmkit.reference import Reference, load_reference, reference
from fmkit.solver import Solver, parse_solver_spec


@dataclass
class Generated:
    images: Tensor  # (N, 3, H, W) uint8
    nfe: list[int]  # per batch
    seconds: float


def generate(
    generator: Generator,
    solver: Solver,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    cond=None,
    guidance: float | None = None,
    interval: tuple[float, float] | None = None,
) -> Generated:
    """Sample `num_samples` images in batches (progress bar), quantised to uint8; `cond`,
    `guidance` and `interval` as in `Generator.sample`."""
    with SamplingBar(num_samples, "sampling", leave=False) as bar:
        samples = generator.sample(
            num_samples, cond, solver, seed=seed, batch_size=batch_size, guidance=guidance,
            interval=interval, progress=lambda x, solution: bar.update(len(x)), convert=to_uint8,
            watch=bar.watch,
        )  # fmt: skip
    return Generated(samples.images, samples.nfe, samples.seconds)


# How conditional models are evaluated, as the field does: the samples' conditions follow the
# data the reference statistics describe (rows of its labels: its class frequencies, its
# attributes' joint distribution), or the kind's few states drawn uniformly (classes, as in
# ImageNet's protocol), guided as the model samples by default unless asked otherwise.
COND_SAMPLING = ("data", "uniform")


@dataclass
class ConditionPlan:
    """What an evaluation asks a model for.

    Attributes:
        kind: the model's condition kind ("none" when unconditional).
        sampling: "none" (unconditional model), "fixed" (every sample gets `fixed`),
            "uniform" (drawn uniformly from `labels`, the kind's states: classes) or "data"
            (rows drawn from `labels`, the data's).
        guidance, interval: classifier-free guidance weight and its interval.
        fixed: the condition of every sample, as `Generator.encode` takes it.
        labels: (N, ...) what rows are drawn from.
    """

    kind: str = "none"
    sampling: str = "none"
    guidance: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    fixed: dict | None = None
    labels: Tensor | None = None

    def draw(self, n: int, seed: int):
        """The conditions of `n` samples (None, a dict for all, or (n, ...) tensors), drawn
        from a generator of their own, so the noise of seed `seed` stays what it was."""
        if self.sampling in ("none", "fixed"):
            return self.fixed
        g = torch.Generator().manual_seed(seed + 1_000_003)
        rows = torch.randint(len(self.labels), (n,), generator=g)  # the data's rows or states
        return {self.kind: self.labels[rows]}

    def record(self) -> dict:
        """What the result records about the conditions."""
        if self.kind == "none":
            return {"kind": "none"}
        out = {
            "kind": self.kind,
            "sampling": self.sampling,
            "guidance": self.guidance,
            "guidance_interval": list(self.interval),
        }
        if self.sampling == "fixed":
            out["fixed"] = self.fixed
        if self.sampling == "data":
            out["data_rows"] = len(self.labels)
        return out


def plan_conditions(
    generator: Generator,
    *,
    cond: dict | None,
    sampling: str | None,
    guidance: float | None,
    interval: tuple[float, float] | None,
    data: dict | None,
) -> ConditionPlan:
    """The ConditionPlan of an evaluation. `data` ({"dataset", "data_dir", "split",
    "options"}, or None when unknown) is where "data" sampling reads its labels."""
    condition = generator.data.condition
    if condition.kind == "none":
        if cond or sampling or guidance is not None or interval is not None:
            raise FmkitError(
                "this model is unconditional: --cond, --cond-sampling and --guidance do not apply"
            )
        return ConditionPlan()
    defaults = generator.defaults
    plan = ConditionPlan(
        condition.kind,
        guidance=defaults.guidance if guidance is None else guidance,
        interval=defaults.guidance_interval if interval is None else interval,
    )
    if cond:
        if sampling:
            raise FmkitError("--cond fixes every sample's condition; drop --cond-sampling")
        generator.encode(cond, 1)  # a bad name fails now, not after the reference statistics
        plan.sampling, plan.fixed = "fixed", dict(cond)
        return plan
    plan.sampling = sampling or "data"
    if plan.sampling == "uniform":
        plan.labels = condition_kind(condition.kind).states(condition)
        if plan.labels is None:
            raise FmkitError(
                f"--cond-sampling uniform draws from a few states (classes); {condition.kind} "
                "conditions are drawn from the data's labels (--cond-sampling data)"
            )
        return plan
    if not data or not data.get("dataset"):
        raise FmkitError(
            "--cond-sampling data needs the dataset the model was trained on: pass --dataset "
            "and --data-dir (or --cond-sampling uniform for classes, or --cond)"
        )
    try:
        dataset = build_dataset(
            data["dataset"], data["data_dir"], generator.data.image_size, data["split"],
            data["options"], condition.kind,
        )  # fmt: skip
    except FmkitError as exc:
        raise FmkitError(
            f"{exc} (--cond-sampling data reads the training data's labels; without the data, "
            "use --cond-sampling uniform for classes, or --cond)"
        ) from None
    labels = getattr(dataset, "labels", None)
    names = tuple(getattr(getattr(dataset, "condition", None), "names", ()))
    if labels is None or not hasattr(dataset, "__len__"):
        raise FmkitError(
            f"dataset '{data['dataset']}' gives no label table to draw conditions from; use "
            "--cond-sampling uniform (classes) or --cond"
        )
    if names and names != condition.names:
        raise FmkitError(
            f"the dataset's {condition.kind} ({', '.join(names[:4])}...) are not the model's "
            f"({', '.join(condition.names[:4])}...); pass the --dataset-opt it was trained with"
        )
    plan.labels = cond_from_labels(list(labels), condition)[condition.kind]
    return plan


def score(
    net: Inception, images: Tensor, ref: Reference, metrics: tuple[str, ...], batch_size: int = 64
) -> dict:
    """The registered `metrics` (names) of uint8 `images` against `ref`: each metric's results,
    from features extracted once."""
    chosen = [metric(name) for name in metrics]
    features = inception_features(net, images, batch_size)
    results: dict[str, float] = {}
    for each in chosen:
        results.update(each.compute(features, ref))
    return results


def metric(name: str) -> Metric:
    """The registered metric `name`, checked to be one fmkit can feed."""
    from fmkit.plugins import registry

    built = registry("metrics").build(name)
    if built.features not in FEATURES:
        raise FmkitError(
            f"metric '{name}' needs {built.features} features; fmkit extracts {', '.join(FEATURES)}"
        )
    return built


@dataclass
class Evaluation:
    """What `fmkit eval fid` / `sweep` need, set up once: the model, the Inception network,
    the reference statistics and the metrics asked for."""

    generator: Generator
    net: Inception
    ref: Reference
    metrics: tuple[str, ...]
    checkpoint: str
    conditions: ConditionPlan = field(default_factory=ConditionPlan)


def setup(
    checkpoint: Path,
    *,
    ema: bool = True,
    metrics: str = "fid",
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    dataset_opts: dict | None = None,
    reference_stats: Path | None = None,
    max_reference_images: int | None = None,
    inception_weights: Path | None = None,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    cond: dict | None = None,
    cond_sampling: str | None = None,
    guidance: float | None = None,
    interval: tuple[float, float] | None = None,
) -> Evaluation:
    """Load the model, plan its conditions and load the reference; the reference dataset
    defaults to the checkpoint's own, with its options (e.g. its crop). A conditional model's
    samples follow `cond` or `cond_sampling` (see ConditionPlan; default: drawn from that
    dataset's labels), guided at `guidance` in `interval` (default: the model's)."""
    generator = Generator.load(checkpoint, ema=ema, device=device)
    wanted = tuple(m.strip() for m in metrics.split(",") if m.strip())
    for name in wanted:  # an unknown metric lists the registered ones
        metric(name)
    trained_on = training_data(checkpoint)
    data = None
    if dataset is not None or trained_on:
        options = dict(trained_on.get("dataset_opts", {})) if dataset is None else {}
        options.update(dataset_opts or {})
        data = {
            "dataset": dataset or trained_on.get("dataset"),
            "data_dir": data_dir or trained_on.get("data_dir"),
            "split": split,
            "options": options,
        }
    plan = plan_conditions(
        generator, cond=cond, sampling=cond_sampling, guidance=guidance, interval=interval,
        data=data,
    )  # fmt: skip
    net = load_inception(inception_weights, device)
    if reference_stats is not None:
        ref = load_reference(reference_stats)
        per_image = [name for name in wanted if metric(name).per_image]
        if per_image and ref.features is None:
            raise FmkitError(
                f"{reference_stats} holds statistics only; {per_image[0]} needs each reference "
                "image's features (let fmkit compute the reference instead)"
            )
    else:
        if data is None:
            raise FmkitError(
                f"{checkpoint} is a weights folder and records no training data: pass --dataset "
                "and --data-dir (or --reference-stats)"
            )
        ref = reference(
            net,
            data["dataset"],
            data["data_dir"],
            split,
            generator.data.image_size,
            data["options"],
            cache_dir,
            max_reference_images,
        )
    return Evaluation(generator, net, ref, wanted, str(checkpoint), plan)


def training_data(source: Path) -> dict:
    """The dataset, its root and options a checkpoint was trained on ({} for a weights
    folder, which records no training data: pass --dataset and --data-dir)."""
    source = Path(source)
    if is_model_folder(source):
        return {}
    meta = checkpoint_module.read_metadata(checkpoint_module.resolve(source))
    config = meta.get("config", {})
    from fmkit.config import TrainConfig

    trained = TrainConfig.from_dict(config)  # today's form of older configs too
    return {
        "dataset": trained.dataset,
        "data_dir": trained.data_dir,
        "dataset_opts": trained.dataset_opts,
    }


def evaluate_solver(
    ev: Evaluation,
    solver_name: str,
    solver: Solver,
    options: dict,
    num_samples: int,
    batch_size: int,
    seed: int,
) -> dict:
    """Generate with one solver setting and score it; the JSON record `fmkit eval` prints."""
    plan = ev.conditions
    gen = generate(
        ev.generator, solver, num_samples, batch_size, seed, plan.draw(num_samples, seed),
        plan.guidance, plan.interval,
    )  # fmt: skip
    results = score(ev.net, gen.images, ev.ref, ev.metrics, batch_size)
    settings = dict(options)
    if not solver.adaptive:
        settings.setdefault("steps", getattr(solver, "steps", None))
    else:
        settings.update(rtol=getattr(solver, "rtol", None), atol=getattr(solver, "atol", None))
    return {
        "format": RECORD,
        **results,
        "metrics": list(ev.metrics),
        "num_samples": num_samples,
        "solver": solver_name,
        "solver_settings": settings,
        "mean_nfe": sum(gen.nfe) / len(gen.nfe),
        "network": {
            "precision": "bf16" if ev.generator.bf16 else "fp32",
            "compiled": ev.generator.network is not ev.generator.module,
        },
        "wall_s": gen.seconds,
        "images_per_s": num_samples / gen.seconds,
        "reference": {
            **ev.ref.description,
            "stats_file": str(ev.ref.path),
            "cached": ev.ref.cached,
        },
        "backend": backend_name(),
        "mode": BACKEND_MODE,
        "inception": {
            "implementation": f"{backend_name()} {BACKEND_MODE}",
            "weights": ev.net.weights_id,
            "resize": RESIZE,
        },
        "conditions": plan.record(),
        "checkpoint": ev.checkpoint,
    }


RECORD = "fmkit-eval"  # the "format" of every record, so `--json` knows the files it wrote


def check_record_file(path: Path) -> None:
    """`--json PATH` may create PATH or replace an earlier record; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        raise FmkitError(f"--json {path} is a folder; give a file name")
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    # Records of earlier versions had no format, but always these keys.
    ours = isinstance(record, dict) and (
        record.get("format") == RECORD or {"checkpoint", "backend", "mean_nfe"} <= record.keys()
    )
    if not ours:
        raise FmkitError(
            f"--json {path} exists and is not an fmkit evaluation record; choose another file"
        )


def result_line(r: dict) -> str:
    """One line summarising a record of `evaluate_solver`."""
    parts = [metric(name).line(r) for name in r["metrics"]]
    ref = r["reference"]
    plan = r.get("conditions", {})
    if plan.get("kind", "none") != "none":
        lo, hi = plan["guidance_interval"]
        parts.append(
            f"{plan['kind']} {plan['sampling']}, guidance {plan['guidance']:g} at {lo:g}..{hi:g}"
        )
    _, steps, named = parse_solver_spec(r["solver"])  # what the spec says is not repeated
    unsaid = {
        k: v
        for k, v in r["solver_settings"].items()
        if v is not None and k not in named and not (k == "steps" and steps is not None)
    }
    solver = f"{r['solver']} ({format_options(unsaid)})" if unsaid else r["solver"]
    return (
        f"{', '.join(parts)} | {r['num_samples']} samples, {solver}, "
        f"mean NFE {r['mean_nfe']:.1f}, {r['images_per_s']:.1f} img/s | reference "
        f"{reference_text(ref)}"
    )


def reference_text(ref: dict) -> str:
    """A reference's description in words: "folder train at 16px", options as KEY=VALUE."""
    options = format_options(ref.get("options") or {})
    words = [ref.get("dataset"), ref.get("split"), options, f"at {ref.get('image_size')}px"]
    return " ".join(str(w) for w in words if w)

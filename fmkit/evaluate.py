"""Sample quality: FID / KID / precision-recall with torch-fidelity's Inception-v3 (the network
of the original TensorFlow FID, ported bit-exactly), against cached reference statistics."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from fmkit import checkpoint as checkpoint_module
from fmkit.batch import collate, cond_from_labels
from fmkit.conditions import condition_kind
from fmkit.data import build_dataset
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, write_atomic
from fmkit.generator import GUIDANCE, GUIDANCE_INTERVAL, Generator, is_model_folder
from fmkit.metrics import frechet_distance, gaussian_stats
from fmkit.pixels import to_uint8
from fmkit.prepared import cache_root
from fmkit.solver import Solver

BACKEND_MODE = (
    "inception-v3-compat"  # torch-fidelity's port of the TF FID Inception, pool3 features
)
# How images reach the network: torch-fidelity's port resizes like TensorFlow 1 did.
RESIZE = "uint8 images, bilinear resize to 299x299 as TensorFlow 1 does (torch-fidelity)"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FMKIT_INCEPTION_WEIGHTS"
PRC_SEED = 2020  # picks the reference subsample for precision/recall


def default_cache_dir() -> Path:
    return cache_root() / "fid"


def _fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise FmkitError("evaluation needs torch-fidelity: pip install 'fmkit[eval]'") from None
    return torch_fidelity


def backend_name() -> str:
    return f"torch-fidelity {_fidelity().__version__}"


@dataclass
class Inception:
    """The feature network and what identifies its weights (part of every cache key)."""

    model: torch.nn.Module
    weights_id: str  # "official" or the MD5 of a local weights file
    device: torch.device


def load_inception(weights: Path | None = None, device: torch.device | str = "cpu") -> Inception:
    """torch-fidelity's Inception-v3. `weights` (or $FMKIT_INCEPTION_WEIGHTS) is a local
    weights file; otherwise torch-fidelity downloads the official one once into the torch hub
    cache. With FMKIT_OFFLINE=1 nothing is downloaded."""
    _fidelity()  # a clear error when torch-fidelity is missing
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torch_fidelity.utils import create_feature_extractor

    device = torch.device(device)
    weights = weights or (Path(os.environ[WEIGHTS_ENV]) if os.environ.get(WEIGHTS_ENV) else None)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    help_line = (
        f"download {URL_INCEPTION_V3} and pass --inception-weights FILE "
        f"(or set {WEIGHTS_ENV}, or put it at {hub_file})"
    )
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FmkitError(f"Inception weights {weights} do not exist; {help_line}")
        try:  # refuse files that would run code: only plain tensors may be inside
            torch.load(weights, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise FmkitError(
                f"{weights} is not a plain Inception state dict ({type(exc).__name__})"
            ) from None
        weights_id = hashlib.md5(weights.read_bytes(), usedforsecurity=False).hexdigest()[:12]
    else:
        if not hub_file.is_file() and os.environ.get("FMKIT_OFFLINE"):
            raise FmkitError(f"no Inception weights and FMKIT_OFFLINE is set; {help_line}")
        weights_id = "official"
    try:
        model = create_feature_extractor(
            BACKEND_MODE,
            ["2048"],
            cuda=device.type == "cuda",
            feature_extractor_weights_path=str(weights) if weights else None,
            verbose=False,
        )
    except (OSError, RuntimeError) as exc:  # no network, truncated file, wrong keys
        raise FmkitError(
            f"could not load the Inception weights ({type(exc).__name__}); {help_line}"
        ) from None
    return Inception(model, weights_id, device)


@torch.no_grad()
def inception_features(net: Inception, images: Tensor, batch_size: int = 64) -> Tensor:
    """(N, 3, H, W) uint8 images -> (N, 2048) float64 pool features."""
    out = []
    for chunk in images.split(batch_size):
        (features,) = net.model(chunk.to(net.device))
        out.append(features.double().cpu())
    return torch.cat(out)


@dataclass
class Reference:
    """Statistics of the real images, and their features when available (KID, precision)."""

    mu: Tensor
    sigma: Tensor
    features: Tensor | None
    path: Path
    description: dict
    cached: bool


def reference(
    net: Inception,
    dataset: str,
    data_dir: str,
    split: str,
    image_size: int,
    options: dict,
    cache_dir: Path | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
) -> Reference:
    """Reference statistics of a dataset, computed once per (dataset, split, options such as
    the crop, resolution, backend and weights) and cached as a .safetensors file."""
    description = {
        "dataset": dataset,
        "split": split,
        "options": dict(sorted(options.items())),
        "image_size": image_size,
        "backend": backend_name(),
        "mode": BACKEND_MODE,
        "weights": net.weights_id,
        "max_images": max_images,
    }
    key = hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]
    cache = claim(cache_dir or default_cache_dir(), REFERENCE_CACHE)
    path = cache.root / f"{dataset}-{split}-{image_size}-{key}.safetensors"
    if path.is_file():
        return load_reference(path, cached=True)
    data = build_dataset(dataset, data_dir, image_size, split, options)
    images = []
    if not hasattr(data, "__len__"):
        raise FmkitError(
            f"reference statistics need a map-style dataset, and '{dataset}' streams shards; "
            "pass --reference-stats FILE or use a prepared/folder copy of the reference images"
        )
    count = len(data) if max_images is None else min(len(data), max_images)
    for i in tqdm(range(count), desc="reference images", unit="img", leave=False):
        images.append(to_uint8(collate([data[i]]).images[0]))
    features = inception_features(net, torch.stack(images), batch_size)
    mu, sigma = gaussian_stats(features)
    blob = safetensors_bytes(
        {"mu": mu, "sigma": sigma, "features": features.float()},
        metadata={"fmkit": json.dumps({**description, "count": count})},
    )
    write_atomic(cache.path(path.name), blob)
    return Reference(mu, sigma, features, path, {**description, "count": count}, cached=False)


# The reference statistics cache (--cache-dir); one written before folders were marked holds
# statistics files only.
REFERENCE_CACHE = FolderKind(
    "reference-stats",
    "FID reference statistics",
    "fmkit eval",
    allowed=("*.safetensors", "*.safetensors.tmp"),
)


def load_reference(path: Path, cached: bool = False) -> Reference:
    """Reference statistics: a file fmkit cached (.safetensors: mu, sigma [, features]) or the
    `.npz` (mu, sigma) of pytorch-fid / clean-fid, in which published CelebA-64 statistics
    come (e.g. fid_stats_celeba64_train_50000_ddim.npz); read without unpickling anything."""
    path = Path(path)
    if path.suffix == ".npz":
        return _load_npz_reference(path)
    from safetensors import safe_open

    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fmkit", "{}"))
        mu, sigma = tensors["mu"].double(), tensors["sigma"].double()
    except Exception:
        raise FmkitError(
            f"{path} is not a reference statistics file (.safetensors with mu and sigma, "
            "or a pytorch-fid/clean-fid .npz)"
        ) from None
    features = tensors.get("features")
    meta = {"source": "fmkit reference statistics", **meta}
    return Reference(mu, sigma, None if features is None else features.double(), path, meta, cached)


def _load_npz_reference(path: Path) -> Reference:

    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except Exception as exc:
        raise FmkitError(
            f"{path} is not a readable .npz of FID statistics with arrays mu and sigma "
            f"({type(exc).__name__}; pickled object arrays are refused)"
        ) from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise FmkitError(
            f"{path}: mu {mu.shape} and sigma {sigma.shape} are not Inception pool features "
            "(2048,) and (2048, 2048)"
        )
    description = {
        "source": "external .npz (pytorch-fid / clean-fid format); its dataset, crop, resize "
        "and Inception port are whatever produced the file",
        "file": path.name,
    }
    return Reference(
        torch.from_numpy(mu), torch.from_numpy(sigma), None, path, description, cached=False
    )


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
    guidance: float = GUIDANCE,
    interval: tuple[float, float] = GUIDANCE_INTERVAL,
) -> Generated:
    """Sample `num_samples` images in batches (progress bar), quantised to uint8; `cond`,
    `guidance` and `interval` as in `Generator.sample`."""
    images, nfe = [], []
    start = time.perf_counter()
    with tqdm(total=num_samples, desc="sampling", unit="img", leave=False) as bar:
        for x, solution in generator.batches(
            num_samples, solver=solver, batch_size=batch_size, seed=seed, cond=cond,
            guidance=guidance, interval=interval,
        ):  # fmt: skip
            images.append(to_uint8(x))
            nfe.append(solution.nfe)
            bar.update(len(x))
    return Generated(torch.cat(images), nfe, time.perf_counter() - start)


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
    plan = ConditionPlan(
        condition.kind,
        guidance=GUIDANCE if guidance is None else guidance,
        interval=GUIDANCE_INTERVAL if interval is None else interval,
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
    """The requested metrics ("fid", "kid", "prc") of uint8 `images` against `ref`."""
    features = inception_features(net, images, batch_size)
    results: dict[str, float] = {}
    if "fid" in metrics:
        results["fid"] = frechet_distance(*gaussian_stats(features), ref.mu, ref.sigma)
    if {"kid", "prc"} & set(metrics):
        if ref.features is None:
            raise FmkitError(
                f"{ref.path} holds statistics only; KID and precision/recall need features"
            )
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        gen, real = features.float(), ref.features.float()
        if "kid" in metrics:
            size = min(1000, len(gen), len(real))
            kid = kid_features_to_metric(
                gen,
                real,
                kid_subsets=100,
                kid_subset_size=size,
                kid_kernel="poly",
                kid_kernel_poly_degree=3,
                kid_kernel_poly_gamma=None,
                kid_kernel_poly_coef0=1,
                rng_seed=2020,
                verbose=False,
            )
            results["kid_mean"], results["kid_std"] = (
                kid["kernel_inception_distance_mean"],
                kid["kernel_inception_distance_std"],
            )
        if "prc" in metrics:
            # Precision/recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
            # for Assessing Generative Models") compares equally many real and generated images;
            # torch-fidelity also builds a dense real x real distance matrix, which for a whole
            # training split (CelebA: 162,770) would need over 100 GB. So the reference is a
            # fixed-seed subsample of as many images as were generated.
            if len(real) > len(gen):
                pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(PRC_SEED))
                real = real[pick[: len(gen)]]
            results["prc_reference_images"] = len(real)
            prc = prc_features_to_metric(
                gen,
                real,
                prc_neighborhood=3,
                prc_batch_size=10000,
                save_cpu_ram=False,
                verbose=False,
            )
            results["precision"], results["recall"] = prc["precision"], prc["recall"]
    return results


METRICS = ("fid", "kid", "prc")


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
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise FmkitError(f"unknown metric '{unknown[0]}'; available: {', '.join(METRICS)}")
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
        "num_samples": num_samples,
        "solver": solver_name,
        "solver_settings": settings,
        "mean_nfe": sum(gen.nfe) / len(gen.nfe),
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
    parts = [f"FID {r['fid']:.4g}"] if "fid" in r else []
    if "kid_mean" in r:
        parts.append(f"KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}")
    if "precision" in r:
        parts.append(f"precision {r['precision']:.3f}, recall {r['recall']:.3f}")
    ref = r["reference"]
    plan = r.get("conditions", {})
    if plan.get("kind", "none") != "none":
        lo, hi = plan["guidance_interval"]
        parts.append(
            f"{plan['kind']} {plan['sampling']}, guidance {plan['guidance']:g} at {lo:g}..{hi:g}"
        )
    return (
        f"{', '.join(parts)} | {r['num_samples']} samples, {r['solver']} {r['solver_settings']}, "
        f"mean NFE {r['mean_nfe']:.1f}, {r['images_per_s']:.1f} img/s | reference "
        f"{ref.get('dataset')} {ref.get('split')} {ref.get('options', {})} {ref.get('image_size')}px"
    )

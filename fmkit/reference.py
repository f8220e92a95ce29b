"""Reference statistics: the Inception features of the real images, their mean and covariance,
computed once per (dataset, split, options, resolution, backend, weights) and cached; or read
from a file (fmkit's, or the .npz of pytorch-fid / clean-fid)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from fmkit.collate import collate
from fmkit.data import build_dataset
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, write_atomic
from fmkit.inception import BACKEND_MODE, Inception, backend_name, inception_features
from fmkit.metrics import gaussian_stats
from fmkit.pixels import to_uint8
from fmkit.prepared import cache_root


def default_cache_dir() -> Path:
    return cache_root() / "fid"


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

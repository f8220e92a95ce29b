"""The prepared cache: a dataset decoded, cropped and resized once into a memory-mapped uint8
array, which loads far faster than decoding image files every epoch.

Layout of a prepared directory:
    images.npy   (N, H, W, 3) uint8, opened with numpy's mmap_mode="r"
    labels.npy   (N, ...) the labels, when the source dataset yielded them, as their condition
                 kind collates them (the built-in kinds: int64)
    noise_seeds.npy  (N,) int64, in reflow's pair folders (fmkit.reflow): image i was generated
                 from the noise `pair_noise` makes of seed i
    meta.json    {"count", "image_size", "source": {...}, "condition": {...}} describing how
                 it was made and what its labels are
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmkit.batch import Batch, Condition, DataSpec, describe
from fmkit.collate import collate, cond_from_labels
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, json_file, write_json
from fmkit.pixels import to_float, to_pixels

META = "meta.json"


def write_array(
    dataset,
    out: Path,
    source: dict,
    progress: bool = True,
    num_workers: int = 0,
    desc: str = "prepare",
) -> Path:
    """Write every item of a map-style `dataset` (without flips) to `out`.

    Items are (3, S, S) tensors in [-1, 1] or (image, label) tuples; a dataset with a
    `pixels(index)` method is read as uint8 directly (no float round trip). `num_workers`
    processes decode in parallel. An earlier prepared array in `out` is replaced; any other
    non-empty folder is refused before anything is written.
    """
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise FmkitError("only a non-empty map-style dataset can be prepared")
    folder = claim(out, PREPARED)
    # Written aside and moved into place whole (meta.json, which says the array is complete,
    # last): concurrent writers (nodes sharing a cache directory) never mix their files, and
    # an earlier array here is replaced, nothing else.
    folder.write_staged(
        lambda staging: _write_staged(dataset, staging, source, progress, num_workers, desc),
        last=(META,),
    )
    return Path(out)


def _write_staged(dataset, staging: Path, source: dict, progress: bool, workers: int, desc: str):
    first = _pixels(dataset, 0)
    images = np.lib.format.open_memmap(
        staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(dataset), *first.shape)
    )
    # Its own generator: writing the cache never moves the global RNG that training draws from.
    loader = torch.utils.data.DataLoader(
        _Pixels(dataset),
        batch_size=256,
        num_workers=workers,
        collate_fn=np.stack,
        generator=torch.Generator(),
    )
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
        done = 0
        for batch in loader:
            images[done : done + len(batch)] = batch
            done += len(batch)
            bar.update(len(batch))
    images.flush()
    del images
    meta = {"count": len(dataset), "image_size": int(first.shape[0]), "source": source}
    save_labels(dataset, staging, meta)
    write_json(staging / META, meta)


def save_labels(dataset, folder: Path, meta: dict) -> None:
    """The dataset's labels, if it has any, as `folder`/labels.npy, stored as their condition
    kind collates them (the built-in kinds: int64), and what they are in `meta["condition"]`
    (so training can condition on them)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return
    condition = describe(dataset, int(meta["image_size"])).condition
    stored = cond_from_labels(list(labels), condition) if condition.kind != "none" else None
    table = stored[condition.kind] if stored else torch.as_tensor(np.stack(list(labels)))
    np.save(folder / "labels.npy", table.numpy())
    meta["condition"] = condition.to_dict()


# A prepared array; those written before folders were marked are recognised by their files.
PREPARED = FolderKind(
    "prepared",
    "a prepared array",
    "fmkit prepare",
    signature=(META, "images.npy"),
    allowed=(META, "images.npy", "labels.npy"),
    recognise=json_file(META, ("count", "image_size")),
)


def pair_noise(seeds: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """(B, *shape) standard normal noise, row i drawn on the CPU from a generator seeded by
    seeds[i]: the same on every machine and independent of how pairs are batched."""
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds
    ]
    return torch.stack(rows)


class _Pixels(torch.utils.data.Dataset):
    """Item i of a dataset as (S, S, 3) uint8 pixels, for parallel decoding."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        return _pixels(self.dataset, index)


def cache_root() -> Path:
    """fmkit's cache directory: $FMKIT_CACHE, else ~/.cache/fmkit."""
    return Path(os.environ.get("FMKIT_CACHE", Path.home() / ".cache" / "fmkit"))


def decoded_cache_dir(dataset, source: dict) -> Path | None:
    """Where the decoded copy of `dataset` lives in the cache, or None when the dataset cannot
    say what its content is (it needs `cache_key()`, e.g. image files, and `pixels(i)`).

    The key covers the source (dataset name, root, split, options) and the content (which
    files, their sizes and times, crop and size), so a changed file means a new copy.
    """
    if not (callable(getattr(dataset, "cache_key", None)) and hasattr(dataset, "pixels")):
        return None
    blob = json.dumps({"source": source, "content": dataset.cache_key()}, sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:16]
    split = f"-{source['split']}" if source.get("split") else ""
    name = f"{source.get('dataset')}{split}-{dataset.image_size}px-{key}"
    return cache_root() / "prepared" / name


def _pixels(dataset, index: int) -> np.ndarray:
    if hasattr(dataset, "pixels"):
        return dataset.pixels(index)
    return to_pixels(collate([dataset[index]]).images[0])


class PreparedArray(torch.utils.data.Dataset):
    """Reads a prepared directory. Items are (3, S, S) float tensors in [-1, 1], or (image,
    label) with a condition; `__getitems__` serves a whole Batch with one array read, with
    each image's paired noise when the directory holds reflow pairs.

    Args:
        root: the prepared directory.
        image_size: must equal the size the cache was written at.
        split: the split asked for; must be the one the array was prepared from, when
            meta.json records one (`split` then says which it is; None when unrecorded).
        condition: "none", or the condition kind the array was prepared with: items then
            carry their label.
    """

    def __init__(
        self,
        root: Path,
        image_size: int,
        split: str | None = None,
        condition: str = "none",
    ):
        root = Path(root)
        if not (root / META).is_file():
            raise FmkitError(f"{root} is not a prepared dataset (no {META}); see `fmkit prepare`")
        self.meta = json.loads((root / META).read_text())
        if self.meta["image_size"] != image_size:
            raise FmkitError(
                f"{root} was prepared at {self.meta['image_size']}x{self.meta['image_size']}, "
                f"not {image_size}x{image_size}; prepare it again with --image-size {image_size}"
            )
        source = self.meta.get("source", {})
        self.split = source.get("split")
        if split is not None and self.split is not None and split != self.split:
            raise FmkitError(
                f"{root} holds the '{self.split}' split of {source.get('dataset', 'a dataset')}, "
                f"not '{split}'; prepare that split into another directory (fmkit prepare "
                f"{source.get('dataset', 'NAME')} --split {split} --out DIR)"
            )
        self.root = root
        self.image_size = image_size
        self.images = np.load(root / "images.npy", mmap_mode="r")  # (N, S, S, 3) uint8
        stored = Condition.from_dict(self.meta.get("condition"))
        self.labels = None
        self.condition = Condition()
        if condition != "none":
            if stored.kind != condition or not (root / "labels.npy").is_file():
                raise FmkitError(
                    f"{root} was prepared without {condition} labels (it has: {stored.kind})"
                )
            self.labels = torch.from_numpy(np.load(root / "labels.npy"))
            self.condition = stored
        seeds = root / "noise_seeds.npy"
        self.noise_seeds = torch.from_numpy(np.load(seeds)) if seeds.is_file() else None

    def describe(self) -> DataSpec:
        return DataSpec(int(self.images.shape[-1]), self.image_size, self.condition)

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int) -> np.ndarray:
        """Image `index` as stored, (S, S, 3) uint8."""
        return np.asarray(self.images[index])

    def __getitem__(self, index: int):
        image = to_float(self.pixels(index))
        return image if self.labels is None else (image, self.labels[index])

    def __getitems__(self, indices: list[int]) -> list | Batch:
        """Items `indices` with one sorted array read: a list of items, as `__getitem__`
        gives them, or, in a reflow pair folder, a whole Batch with each image's noise
        (fmkit's collate passes it through; torch's default collate cannot)."""
        order = np.argsort(indices)  # sorted reads are sequential on disk
        pixels = np.empty((len(indices), *self.images.shape[1:]), dtype=np.uint8)
        pixels[order] = self.images[np.asarray(indices)[order]]
        images: Tensor = to_float(pixels)  # (B, 3, S, S)
        if self.noise_seeds is not None:
            labels = None if self.labels is None else self.labels[indices]
            cond = None if labels is None else cond_from_labels(labels, self.condition)
            return Batch(images, cond, pair_noise(self.noise_seeds[indices], images.shape[1:]))
        if self.labels is None:
            return list(images)
        return list(zip(images, self.labels[indices], strict=True))

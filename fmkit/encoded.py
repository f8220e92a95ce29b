"""The encoded cache: a dataset's images encoded once by a costly encoder (a space that is
`encoded_once`, such as a pretrained autoencoder's), each image with its mirror image, so
training reads encodings and never runs the encoder after the first pass.

A flipped image's latent is not the flipped latent, so both are stored and augmentation picks
one (`Batch.mirror`). The key covers the images (the decoded cache's key: files, crop, size,
labels) and the encoder (`Space.fingerprint()`: its weights' hash and scaling), so changing
either makes a new copy.

Layout of an encoded directory (under fmkit's cache, `encoded/`):
    latents.npy  (N, 2, c, s, s) float16, opened with numpy's mmap_mode="r": [:, 0] image i's
                 encoding, [:, 1] its mirror image's
    labels.npy   (N, ...) as in prepared arrays, when the images carry labels
    meta.json    {"count", "image_size", "shape": [c, s], "space": {...}, "images": {...},
                 "stats": {"mean": [c], "std": [c]}} (stats: per channel, over the images'
                 encodings: a scaled autoencoder's latents should have std near 1)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmkit.batch import Batch, Condition
from fmkit.collate import cond_from_labels
from fmkit.folders import FolderKind, claim, json_file, write_json
from fmkit.pixels import to_float
from fmkit.prepared import PreparedArray, _Pixels, cache_root, save_labels
from fmkit.space import Space

META = "meta.json"


def images_key(dataset) -> dict | None:
    """What a dataset's pixels depend on, or None when it cannot say (streams, custom
    datasets): its `cache_key()`, or a prepared array's folder, record and file time."""
    if callable(getattr(dataset, "cache_key", None)):
        return dataset.cache_key()
    if isinstance(dataset, PreparedArray):
        images = dataset.root / "images.npy"
        return {
            "prepared": str(dataset.root.resolve()),
            "meta": dataset.meta,
            "mtime_ns": images.stat().st_mtime_ns,
        }
    return None


def encoded_dir(images: dict, space: dict, image_size: int) -> Path:
    """Where the encodings of the images `images` describes, by the space `space` describes
    ({"name", "fingerprint", ...}), live in fmkit's cache."""
    blob = json.dumps({"images": images, "space": space}, sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:16]
    return cache_root() / "encoded" / f"{space['name']}-{image_size}px-{key}"


def encoded(
    dataset,
    space: Space,
    space_name: str,
    image_size: int,
    *,
    writer: bool,
    progress: bool,
    device: torch.device,
    condition: str = "none",
    mirrors: bool = True,
) -> EncodedArray | None:
    """`dataset` as its encodings from the encoded cache, written on first use by the process
    with `writer` set (one per node; the others poll for its meta.json, as `data.cached`
    does); None when the dataset cannot describe its content (then batches are encoded as
    they come). `mirrors`: also read each image's mirror encoding (training with flips)."""
    key = images_key(dataset)
    if key is None or not hasattr(dataset, "__len__"):
        return None
    about = {"name": space_name, "fingerprint": space.fingerprint()}
    cache = encoded_dir(key, about, image_size)
    if writer and not (cache / META).is_file():
        folder = claim(cache, ENCODED)
        meta = {"count": len(dataset), "image_size": image_size, "space": about, "images": key}
        folder.write_staged(
            lambda staging: _write(dataset, space, staging, meta, device, progress, cache),
            last=(META,),
        )
    while not (cache / META).is_file():
        time.sleep(2.0)
    return EncodedArray(cache, condition=condition, mirrors=mirrors)


@torch.no_grad()
def _write(dataset, space, staging: Path, meta: dict, device, progress: bool, final: Path):
    n = len(dataset)
    loader = torch.utils.data.DataLoader(
        _Pixels(dataset), batch_size=32, collate_fn=np.stack, generator=torch.Generator()
    )
    latents = None
    total = torch.zeros(2, dtype=torch.float64)  # per channel below, once the shape is known
    with tqdm(total=n, desc=f"encoding once into {final}", unit="img", disable=not progress) as bar:
        done = 0
        for pixels in loader:
            images = to_float(pixels).to(device)  # (b, 3, S, S)
            both = space.encode(torch.cat([images, images.flip(-1)])).float().cpu()
            if latents is None:
                shape = tuple(both.shape[1:])  # (c, s, s)
                latents = np.lib.format.open_memmap(
                    staging / "latents.npy", mode="w+", dtype=np.float16, shape=(n, 2, *shape)
                )
                total = torch.zeros(3, shape[0], dtype=torch.float64)  # count, sum, sum of sq
            b = len(images)
            pairs = torch.stack([both[:b], both[b:]], dim=1)  # (b, 2, c, s, s)
            latents[done : done + b] = pairs.half().numpy()
            own = both[:b].double().transpose(0, 1).flatten(1)  # (c, b s s)
            total += torch.stack([torch.full_like(own[:, 0], own.shape[1]), own.sum(1),
                                  own.square().sum(1)])  # fmt: skip
            done += b
            bar.update(b)
    count, first, second = total
    mean = first / count
    std = (second / count - mean.square()).clamp_min(0).sqrt()
    latents.flush()
    del latents
    save_labels(dataset, staging, meta)
    meta["shape"] = [int(shape[0]), int(shape[1])]
    meta["stats"] = {"mean": mean.tolist(), "std": std.tolist()}
    write_json(staging / META, meta)


ENCODED = FolderKind(
    "encoded",
    "an encoded cache",
    "fmkit train (an encoded space)",
    allowed=(META, "latents.npy", "labels.npy"),
    recognise=json_file(META, ("count", "space")),
)


class EncodedArray(torch.utils.data.Dataset):
    """Reads an encoded directory: `__getitems__` serves a whole Batch (encodings, their
    mirror images' when `mirrors`, conditions) with one sorted array read.

    Args:
        root: the encoded directory.
        condition: "none", or the condition kind the images carry (their labels were stored).
        mirrors: also read each image's mirror encoding (`Batch.mirror`).
    """

    def __init__(self, root: Path, condition: str = "none", mirrors: bool = True) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / META).read_text())
        self.latents = np.load(self.root / "latents.npy", mmap_mode="r")  # (N, 2, c, s, s)
        self.mirrors = mirrors
        self.labels, self.condition = None, Condition()
        if condition != "none":
            self.labels = torch.from_numpy(np.load(self.root / "labels.npy"))
            self.condition = Condition.from_dict(self.meta.get("condition"))

    @property
    def stats(self) -> dict:
        """Per-channel mean and std of the images' encodings: {"mean": [c], "std": [c]}."""
        return self.meta["stats"]

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> Tensor:
        return torch.from_numpy(self.latents[index, 0].astype(np.float32))

    def __getitems__(self, indices: list[int]) -> Batch:
        order = np.argsort(indices)  # sorted reads are sequential on disk
        views = slice(None) if self.mirrors else slice(0, 1)
        rows = np.empty((len(indices), *self.latents[0, views].shape), dtype=np.float16)
        rows[order] = self.latents[np.asarray(indices)[order], views]
        both = torch.from_numpy(rows).float()  # (B, 1 or 2, c, s, s)
        cond = None
        if self.labels is not None:
            cond = cond_from_labels(self.labels[indices], self.condition)
        return Batch(both[:, 0], cond, mirror=both[:, 1] if self.mirrors else None)

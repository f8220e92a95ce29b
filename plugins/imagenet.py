"""The `imagenet` dataset: WebDataset tar shards (Aizman et al. 2019, "High Performance I/O
For Large Scale Deep Learning"), split by node and worker; and `fmkit prepare imagenet`, which
writes such shards from the usual class-per-folder layout."""

from __future__ import annotations

import fnmatch
import glob
import itertools
import random
from pathlib import Path
from typing import Literal

import click
import torch

from fmkit import FmkitError, hookimpl
from fmkit.batch import Condition, DataSpec
from fmkit.folders import FolderKind, claim, inside
from fmkit.images import IMAGE_EXTENSIONS, crop_resize, open_rgb
from fmkit.pixels import pil_pixels, to_float

IMAGE_KEYS = ("jpg", "jpeg", "png")


def resolve_shards(root: str, split: str) -> str | list[str]:
    """A directory -> its sorted `{split}-*.tar` (else all `*.tar`); a brace pattern or URL is
    passed to WebDataset unchanged."""
    if "{" in root or "://" in root or root.startswith("pipe:"):
        return root
    path = Path(root)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FmkitError(f"no WebDataset shards at {root} (not a directory, file, pattern or URL)")
    shards = sorted(glob.glob(str(path / f"{split}-*.tar"))) or sorted(
        glob.glob(str(path / "*.tar"))
    )
    if not shards:
        raise FmkitError(f"no .tar shards in {root}")
    return shards


def decode_sample(sample: dict, image_size: int, labels: bool):
    """Decode the image and class fields of one WebDataset sample; other fields (pickles,
    .pyd, ...) are never touched, so untrusted shards cannot run code."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_KEYS)})")
    image = to_float(pil_pixels(crop_resize(open_rgb(sample[key]), None, image_size)))
    if not labels:
        return image
    return image, int(sample["cls"].decode() if isinstance(sample["cls"], bytes) else sample["cls"])


class WebDatasetImages(torch.utils.data.IterableDataset):
    """Images from WebDataset shards.

    Args:
        urls: shard list, brace pattern or URL.
        image_size: output side length (centre square, antialiased resize).
        classes: class names when items are (image, class index); None for images only.
        shuffle_buffer: samples shuffled in memory (0: keep shard order).
        resampled: draw shards with replacement forever; an epoch is `epoch_length` samples.
        epoch_length: samples per epoch over all ranks and workers (resampled mode).
        seed: shard-shuffle seed.

    Without `resampled`, shards are split by node (rank) and then by DataLoader worker, so each
    sample is seen exactly once per epoch across all ranks.
    """

    def __init__(
        self,
        urls,
        image_size: int,
        classes: list[str] | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
    ) -> None:
        if resampled and not epoch_length:
            raise FmkitError("imagenet: resampled=True needs epoch_length (samples per epoch)")
        self.urls = urls
        self.image_size = image_size
        self.classes = classes
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.seed = seed
        self.epoch = 0

    def describe(self) -> DataSpec:
        if self.classes is None:
            return DataSpec(3, self.image_size)
        return DataSpec(3, self.image_size, Condition("class", tuple(self.classes)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import webdataset as wds

        pipeline = wds.WebDataset(
            self.urls,
            resampled=self.resampled,
            shardshuffle=False if self.resampled or not self.shuffle_buffer else 100,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
            seed=self.seed + self.epoch,
        )
        if self.shuffle_buffer:
            pipeline = pipeline.shuffle(self.shuffle_buffer)
        labels = self.classes is not None
        samples = (decode_sample(s, self.image_size, labels) for s in pipeline)
        if self.resampled:
            rank, world, worker, workers = wds.utils.pytorch_worker_info()
            # Every rank and worker yields the same count, so no rank waits at an epoch's end.
            samples = itertools.islice(samples, self.epoch_length // (world * workers))
        yield from samples


def class_names(root: str, num_classes: int | None) -> list[str]:
    """classes.txt beside the shards (as `fmkit prepare imagenet` writes it), else
    `num_classes` names "0", "1", ..."""
    listing = Path(root) / "classes.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if num_classes is None:
        raise FmkitError(
            f"imagenet: --condition class needs the class names: put classes.txt in {root} "
            "(fmkit prepare imagenet writes it) or pass --dataset-opt num_classes=K"
        )
    return [str(i) for i in range(num_classes)]


def imagenet(
    *,
    root: str,
    image_size: int,
    split: str = "train",
    condition: Literal["none", "class"] = "none",
    num_classes: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    epoch_length: int | None = None,
    seed: int = 0,
) -> WebDatasetImages:
    """ImageNet (or any image set) as WebDataset shards: a directory, brace pattern or URLs.

    Options: shuffle_buffer, resampled + epoch_length, seed; num_classes when the shards come
    without classes.txt. With condition="class" items are (image, class index).
    """
    classes = class_names(root, num_classes) if condition == "class" else None
    return WebDatasetImages(
        resolve_shards(root, split),
        image_size,
        classes,
        shuffle_buffer,
        resampled,
        epoch_length,
        seed,
    )


def write_shards(src: Path, out: Path, per_shard: int, seed: int, prefix: str) -> tuple[int, int]:
    """Write class-per-folder images as shuffled shards; bytes are copied, not re-encoded.
    Returns (samples, classes)."""
    import webdataset as wds

    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise FmkitError(f"{src} has no class folders (expected {src}/<class>/<image>)")
    items = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((src / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise FmkitError(f"no images in the class folders of {src}")
    random.Random(seed).shuffle(items)  # shards must not hold one class each
    if not prefix or prefix in (".", "..") or "/" in prefix or "\\" in prefix:
        raise FmkitError(f"--split {prefix!r} names the shards (SPLIT-000000.tar): a plain name")
    if inside(out, src) or inside(src, out):
        raise FmkitError(f"--out {out} and --src {src} overlap; choose an --out outside --src")
    folder = claim(out, SHARD_FOLDER)
    shards = [f"{prefix}-{k:06d}.tar" for k in range(-(-len(items) // per_shard))]
    folder.add(*shards, "classes.txt")
    # Shards end at --per-shard samples only (no size limit), so they are the ones recorded.
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, maxsize=2**62, verbose=0) as sink:
        for i, (path, index) in enumerate(items):
            ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower()[1:]
            sink.write({"__key__": f"{i:08d}", ext: path.read_bytes(), "cls": index})
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    # Shards of this split from an earlier, larger write must not be read with the new ones.
    stale = fnmatch.filter(folder.recorded, f"{glob.escape(prefix)}-*.tar")
    folder.retire(keep=[n for n in folder.recorded if n not in stale or n in shards])
    return len(items), len(classes)


# A shard folder (several splits may share one). One from before folders were marked is a
# user's: stale shards of a split are removed, which must never hit someone else's.
SHARD_FOLDER = FolderKind("shards", "WebDataset shards", "fmkit prepare imagenet")


@hookimpl
def register_commands(cli):
    prepare = cli.commands.get("prepare")
    if prepare is None:
        return

    @prepare.command("imagenet")
    @click.option(
        "--src",
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Class-per-folder root (ILSVRC/train).",
    )
    @click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory for the shards.",
    )
    @click.option(
        "--per-shard",
        default=1000,
        show_default=True,
        type=click.IntRange(1),
        help="Samples per shard.",
    )
    @click.option("--split", default="train", show_default=True, help="Shard name prefix.")
    @click.option("--seed", default=0, show_default=True, help="Shuffle seed.")
    def prepare_imagenet(src: Path, out: Path, per_shard: int, split: str, seed: int) -> None:
        """Write WebDataset shards from SRC/<class>/<image> (JPEG bytes copied, shuffled)."""
        count, classes = write_shards(src, out, per_shard, seed, split)
        click.echo(f"wrote {count} samples of {classes} classes to {out}/{split}-*.tar")


@hookimpl
def register_datasets(register):
    register("imagenet", imagenet)

"""Datasets for training: building them by name, their decoded cache and DataLoaders."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fmkit.batch import Collate, Condition, DataSpec, describe
from fmkit.errors import FmkitError
from fmkit.plugins import registry


def build_dataset(
    name: str,
    root: str,
    image_size: int,
    split: str = "train",
    options: dict[str, Any] | None = None,
    condition: str = "none",
):
    """The registered dataset `name`, built with fmkit's fixed arguments and user `options`.

    `condition` ("none", or a registered condition kind) asks the dataset to yield those
    conditions; a dataset that cannot is an error naming it.
    """
    options = dict(options or {})
    datasets = registry("datasets")
    given: dict[str, Any] = {"root": root, "image_size": image_size, "split": split}
    if condition != "none":
        registry("conditions").get(condition)  # an unknown kind, with the known ones listed
        if not datasets.accepts(name, "condition"):
            raise FmkitError(f"dataset '{name}' yields no conditions; use --condition none")
        given["condition"] = condition
    return datasets.build(name, options, **given)


def data_spec(dataset, image_size: int, channels: int, condition: str) -> DataSpec:
    """What `dataset` yields; with condition "none", its labels are ignored."""
    spec = describe(dataset, image_size, channels)
    if condition == "none":
        return DataSpec(spec.channels, spec.image_size, Condition())
    if spec.condition.kind != condition:
        has = "no conditions" if spec.condition.kind == "none" else spec.condition.kind
        raise FmkitError(f"--condition {condition}: the dataset yields {has} (not {condition})")
    return spec


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    sampler=None,
    condition: Condition | None = None,
) -> DataLoader:
    """A DataLoader with the settings that keep a GPU fed: pinned memory, persistent workers
    and prefetching when workers are used; iterable datasets shuffle themselves.

    With `condition`, batches are `fmkit.batch.Batch` objects (images and conditions); without,
    the default collation (the seed's image tensors).
    """
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # An iterable dataset's set_epoch (its shuffle seed) reaches workers only when they
        # are started anew each epoch.
        persistent_workers=num_workers > 0 and not iterable,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=generator,
        collate_fn=None if condition is None else Collate(condition),
    )


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """DataLoader workers when --num-workers is not given: none on the CPU (they would take
    cores from the model), and this process's share of the cores, up to 8, on a GPU."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // local_world_size))


def cached(
    dataset,
    source: dict,
    writer: bool,
    progress: bool,
    condition: str = "none",
):
    """`dataset` read from its decoded copy in fmkit's cache, written on first use by the
    process with `writer` set (one per node; the others wait for its meta.json), so image
    files are decoded, cropped and resized once rather than every epoch of every run.
    Datasets that cannot describe their content (streams, custom ones) are returned as is.

    The others poll the file instead of waiting in a collective: decoding a large dataset can
    take longer than --dist-timeout, and if the writer fails, torchrun stops the whole job."""
    from fmkit.prepared import META, PreparedArray, decoded_cache_dir, write_array

    cache = decoded_cache_dir(dataset, source)
    if cache is None:
        return dataset
    if writer and not (cache / META).is_file():
        workers = min(8, os.cpu_count() or 1) if len(dataset) >= 2048 else 0
        write_array(
            dataset,
            cache,
            source,
            progress=progress,
            num_workers=workers,
            desc=f"decoding once into {cache}",
        )
    while not (cache / META).is_file():
        time.sleep(2.0)
    return PreparedArray(cache, dataset.image_size, condition=condition)


def source_of(name: str, root: str, split: str | None, options: dict) -> dict:
    """How a dataset was made, as recorded by prepared arrays and cache keys."""
    return {
        "dataset": name,
        "data_dir": str(Path(root).resolve()),
        "split": split,
        "options": dict(sorted(options.items())),
    }

"""DataLoaders over registered datasets, and the seed's `load_celeba_data`."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fmkit.plugins import registry


def build_dataset(
    name: str,
    root: str,
    image_size: int,
    split: str = "train",
    options: dict[str, Any] | None = None,
    flip: bool | None = None,
):
    """The registered dataset `name`; a `split` in `options` overrides `split`. `flip` (when not None) sets the dataset's flip option,
    if it has one and the user did not set it."""
    options = dict(options or {})
    split = options.pop("split", split)  # `--dataset-opt split=valid` chooses the split
    factory = registry("datasets").get(name).factory
    if flip is not None and "flip" in inspect.signature(factory).parameters:
        options.setdefault("flip", flip)
    return registry("datasets").build(name, options, root=root, image_size=image_size, split=split)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    sampler=None,
) -> DataLoader:
    """A DataLoader with the settings that keep a GPU fed: pinned memory, persistent workers
    and prefetching when workers are used; iterable datasets shuffle themselves."""
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=generator,
    )


def load_celeba_data(
    batch_size: int = 32,
    data_dir: str = "./data",
    image_size: int = 64,
    split: str = "train",
    num_workers: int = 0,
    **options: Any,
) -> DataLoader:
    """The seed's loader: CelebA (downloaded on first use) batched as (B, 3, S, S) in [-1, 1].

    Options (crop, flip, labels, ...) are the `celeba` dataset's.
    """
    data = build_dataset("celeba", data_dir, image_size, split, options)
    return make_loader(data, batch_size, num_workers, shuffle=split == "train")

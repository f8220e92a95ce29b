"""Datasets for training: building them by name, their decoded cache and DataLoaders."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from fmkit.batch import Condition, DataSpec, describe
from fmkit.collate import Collate
from fmkit.errors import FmkitError
from fmkit.plugins import registry
from fmkit.space import Space


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
        worker_init_fn=_leave_signals_to_the_main_process if num_workers > 0 else None,
    )


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A worker ignores Ctrl-C and SIGTERM, which reach the whole process group: the main
    process finishes its step and saves (fmkit.interrupt), then shuts the workers down; a worker
    that died on the signal would fail that step instead. (Workers still exit if the main
    process dies: torch's watchdog.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


class EpochSampler(Sampler[int]):
    """This rank's share of a shuffled order that depends only on (seed, epoch).

    Global batch k is positions [k*B, (k+1)*B) of the epoch's permutation; rank r reads its
    contiguous slice of B / world of it. So the data of a step does not depend on the number of
    processes, every rank gets the same number of batches, and a run can start mid-epoch.

    Args:
        size: dataset length.
        seed: run seed.
        global_batch: B, images per optimizer step over all ranks.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, size: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.global_batch = size, seed, global_batch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches(self) -> int:
        """Full global batches in an epoch."""
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)
        local = self.global_batch // self.world_size
        for k in range(self.start_batch, self.batches):
            first = k * self.global_batch + self.rank * local
            yield from order[first : first + local].tolist()

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * (self.global_batch // self.world_size)


def _as_is(x: Tensor) -> Tensor:
    return x


def scale_note(std: list[float]) -> None:
    """Say so when the encodings' per-channel std, measured on the data, is far from the 1
    that noise has: the space's scaling factor does not suit these images."""
    low, high = min(std), max(std)
    if low < 0.5 or high > 2.0:
        print(
            f"note: the encoded images' per-channel std is {low:.3g}-{high:.3g} (noise has 1); "
            "the space's scaling factor does not suit these images"
        )


class TrainingData:
    """The data of a training run: the dataset (read from its decoded cache, or its encoded
    cache in a space that is `encoded_once`), what it yields, its order and this process's
    micro-batches.

    Args:
        cfg: the run's TrainConfig (dataset, options, condition, batch, seed, workers).
        info: this process under torchrun (rank, world size, local rank).
        device: where training runs (pinned memory and workers on a GPU).
        micro_batch: images per forward/backward on this process.
        progress: show the decoding progress (rank 0).
        space: where the model trains (fmkit.space); `encode` takes a batch's images there.
    """

    def __init__(
        self, cfg, info, device: torch.device, micro_batch: int, progress: bool, space: Space
    ) -> None:
        dataset = build_dataset(
            cfg.dataset, cfg.data_dir, cfg.image_size, cfg.split, cfg.dataset_opts, cfg.condition
        )
        self.spec = data_spec(dataset, cfg.image_size, cfg.channels, cfg.condition)
        if cfg.cache_dataset:
            options = {**cfg.dataset_opts, "condition": cfg.condition}
            split = getattr(dataset, "split", cfg.split)
            dataset = cached(
                dataset,
                source_of(cfg.dataset, cfg.data_dir, split, options),
                writer=info.local_rank == 0,
                progress=progress and info.is_main,
                condition=cfg.condition,
            )
        #: images (B, C, S, S) -> what the model trains on; as is when read already encoded
        self.encode: Callable[[Tensor], Tensor] = space.encode
        if space.encoded_once and cfg.cache_dataset:
            from fmkit.encoded import encoded

            stored = encoded(
                dataset, space, cfg.space, cfg.image_size, writer=info.local_rank == 0,
                progress=progress and info.is_main, device=device, condition=cfg.condition,
                mirrors=cfg.hflip,
            )  # fmt: skip
            if stored is not None:
                dataset, self.encode = stored, _as_is
                if progress and info.is_main:
                    scale_note(stored.stats["std"])
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable and len(dataset) < cfg.batch_size:
            raise FmkitError(
                f"the dataset has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}"
            )
        self.dataset, self.info = dataset, info
        self.sampler = None
        if not self.iterable:
            self.sampler = EpochSampler(
                len(dataset), cfg.seed, cfg.batch_size, info.rank, info.world_size
            )
        workers = cfg.num_workers
        if workers is None:
            workers = default_workers(device, info.local_world_size)
        self.loader = make_loader(
            dataset,
            micro_batch,
            workers,
            sampler=self.sampler,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed + info.rank),
            condition=self.spec.condition,
        )

    @property
    def steps_per_epoch(self) -> int | None:
        """Global batches in an epoch (None for shards, whose length is unknown)."""
        return None if self.sampler is None else self.sampler.batches

    def epoch(self, epoch: int, start_batch: int, grad_accum: int) -> Iterator[list]:
        """The rest of `epoch` from global batch `start_batch`, as lists of `grad_accum`
        micro-batches (fmkit.batch.Batch)."""
        from fmkit import distributed

        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch)
        elif hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        batches = iter(self.loader)
        while True:
            micro = list(itertools.islice(batches, grad_accum))
            have = len(micro) == grad_accum
            if self.iterable:  # shards may give ranks unequal counts: stop together
                have = bool(distributed.all_min(int(have), self.info))
            if not have:
                return
            yield micro

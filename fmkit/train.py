"""The training loop: one function, in commented steps."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import IterableDataset, Sampler
from tqdm.auto import tqdm

from fmkit import __version__ as fmkit_version
from fmkit import checkpoint, distributed
from fmkit.config import TrainConfig
from fmkit.data import build_dataset, make_loader
from fmkit.errors import FmkitError
from fmkit.flow import FlowMatching, sample_time
from fmkit.plugins import plugin_info, registry
from fmkit.prepared import PreparedArray, decoded_cache_dir, write_array
from fmkit.solver import build_solver
from fmkit.visualize import visualize_samples


class EMA:
    """Exponential moving average of a model's weights, with warm-up.

    Update n (from 0) uses decay min(target, n / (n + warmup)): the first update copies the
    weights, and until the target is reached the average is the power-function EMA of Karras
    et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models") with
    exponent warmup - 1, i.e. it weights step i by about (i / n)^(warmup - 1) and so always
    covers a fixed fraction of the run so far (about 1 / (warmup + 1) of it on average).
    warmup = 0 turns the ramp off (plain EMA at the target decay).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmup == 0:
            return self.decay
        return min(self.decay, self.updates / (self.updates + self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.updates += 1


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


def resolve_device(name: str) -> torch.device:
    """ "auto", "cpu" or "cuda" as a device. On CUDA this also turns on TF32 matmuls and
    convolutions, fmkit's default for fp32 work on a GPU (training and sampling alike)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FmkitError("--device cuda was asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def default_workers(device: torch.device, info: distributed.DistInfo) -> int:
    """DataLoader workers when --num-workers is not given: none on the CPU (they would take
    cores from the model), and this process's share of the cores, up to 8, on a GPU."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // info.local_world_size))


def decoded(dataset, cfg: TrainConfig, info: distributed.DistInfo, progress: bool):
    """`dataset` read from its decoded copy in fmkit's cache, written on first use, so image
    files are decoded, cropped and resized once rather than every epoch of every run.
    Datasets that cannot describe their content (streams, custom ones) are returned as is."""
    source = {
        "dataset": cfg.dataset,
        "data_dir": str(Path(cfg.data_dir).resolve()),
        "split": getattr(dataset, "split", "train"),
        "options": {k: v for k, v in sorted(cfg.dataset_opts.items()) if k != "flip"},
    }
    cache = decoded_cache_dir(dataset, source)
    if cache is None:
        return dataset
    if not (cache / "meta.json").is_file() and info.local_rank == 0:  # one writer per node
        workers = min(8, os.cpu_count() or 1) if len(dataset) >= 2048 else 0
        write_array(
            dataset,
            cache,
            source,
            progress=progress and info.is_main,
            num_workers=workers,
            desc=f"decoding once into {cache}",
        )
    distributed.barrier(info)
    return PreparedArray(
        cache,
        cfg.image_size,
        flip=getattr(dataset, "flip", False),
        labels=getattr(dataset, "labels", None) is not None,
    )


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Noise and times of step `step` depend only on (seed, step): resumes are exact.

    The generator lives on the training device, so a GPU draws its own noise instead of
    waiting for the CPU to draw it and copy it over (a CPU and a GPU run draw different noise).
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)


def component_info(kind: str, name: str) -> dict:
    entry = registry(kind).get(name)
    info = plugin_info(entry.plugin)
    return {
        "name": name,
        "plugin": entry.plugin,
        "distribution": info.distribution,
        "version": info.version,
    }


def _tensorboard(out: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train `cfg.backbone` on `cfg.dataset`; returns the final checkpoint's path.

    Under torchrun every process calls this; rank 0 alone writes outputs. Outputs in
    `cfg.output`: config.json, checkpoint_epoch_N / checkpoint_step_N / checkpoint_final
    (.safetensors), samples_epoch_N / samples_step_N / final_samples_grid (.png, from the EMA
    weights) and metrics.jsonl.
    """
    info = distributed.from_environment()
    try:
        return _train(cfg, resume, progress, info)
    except FmkitError as exc:
        raise FmkitError(f"rank {info.rank}: {exc}" if info.enabled else str(exc)) from None
    except dist.DistBackendError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmkitError(
            f"rank {info.rank}: lost contact with another rank, which probably died ({first}); "
            "the checkpoints written so far are intact"
        ) from None
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, resume: bool, progress: bool, info: distributed.DistInfo) -> Path:
    out = Path(cfg.output)
    if not resume and any(out.glob("checkpoint_*.safetensors")):
        # Never overwrite an earlier run's checkpoints by accident.
        raise FmkitError(
            f"{out} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --output"
        )
    if cfg.batch_size % (info.world_size * cfg.grad_accum):
        raise FmkitError(
            f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over "
            f"{info.world_size} process(es) x --grad-accum {cfg.grad_accum}"
        )
    local_batch = cfg.batch_size // info.world_size  # this rank's images per step
    micro_batch = local_batch // cfg.grad_accum  # images per forward/backward
    device = distributed.init(info, resolve_device(cfg.device), cfg.dist_timeout)
    main = info.is_main
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)

    # Build model, EMA, optimizer (first: a bad name or option fails before any download).
    model = (
        registry("backbones")
        .build(cfg.backbone, cfg.backbone_opts, image_size=cfg.image_size, channels=cfg.channels)
        .to(device)
    )
    model = model.to(memory_format=memory_format)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    # Fused AdamW (one kernel for all parameters) by default on CUDA; torch >= 2.4 also has it
    # on the CPU, where --fused-adamw lets a test run what a GPU run runs.
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
    )
    trained: nn.Module = model
    ddp: DistributedDataParallel | None = None
    if info.enabled:  # gradients are averaged over ranks during backward
        trained = ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        trained = torch.compile(trained)
    flow = FlowMatching(
        trained, registry("paths").build(cfg.path, cfg.path_opts), time_sampling=cfg.time_sampling
    )

    # Load dataset.
    dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, "train", cfg.dataset_opts)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device, info)
    if cfg.cache_dataset:
        dataset = decoded(dataset, cfg, info, progress)
    iterable = isinstance(dataset, IterableDataset)
    if not iterable and len(dataset) < cfg.batch_size:
        raise FmkitError(
            f"the dataset has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}"
        )
    sampler = None
    if not iterable:
        sampler = EpochSampler(len(dataset), cfg.seed, cfg.batch_size, info.rank, info.world_size)
    loader = make_loader(
        dataset,
        micro_batch,
        workers,
        sampler=sampler,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed + info.rank),
    )

    # Resume from the newest checkpoint in the run directory.
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume and (latest := checkpoint.find_latest(out)) is not None:
        tensors, meta = checkpoint.load(latest)
        try:
            model.load_state_dict(checkpoint.unpack_state("model", tensors))
            ema.model.load_state_dict(checkpoint.unpack_state("ema", tensors))
        except RuntimeError:
            raise FmkitError(
                f"{latest} holds a different architecture than the flags ask for"
            ) from None
        checkpoint.load_optimizer(optimizer, tensors, meta["optimizer"])
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        ema.updates = meta["ema_updates"]
        saved_world = meta.get("world_size", 1)
        if saved_world == info.world_size:
            prefix = f"rng.{{}}.{info.rank}"
            distributed.set_rng_state(
                {
                    k: tensors[prefix.format(k)]
                    for k in ("torch", "cuda")
                    if prefix.format(k) in tensors
                },
                device,
            )
            note = ""
        else:
            note = (
                f"; it was written by {saved_world} process(es), this run has {info.world_size}: "
                "the data order is kept but random flips and dropout differ, so it is not bit-exact"
            )
        if main:
            print(f"resumed from {latest} at step {step} (epoch {epoch}){note}")
    if main:  # only now: a run that cannot start (no data, bad options) leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    steps_per_epoch = sampler.batches if sampler is not None else None
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = steps_per_epoch * cfg.epochs if steps_per_epoch else None
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    grid_noise = torch.randn(
        cfg.num_samples, *shape, generator=torch.Generator().manual_seed(cfg.seed)
    )
    grid_solver = build_solver("euler", steps=cfg.sample_steps)
    components = {
        "backbone": component_info("backbones", cfg.backbone),
        "dataset": component_info("datasets", cfg.dataset),
        "path": component_info("paths", cfg.path),
    }

    def save(name: str) -> Path:
        # Collective: every rank sends its RNG state, rank 0 writes the file.
        check_finite()  # never write a checkpoint of diverged weights
        rng_states = distributed.gather_rng_states(info, device)
        path = out / f"checkpoint_{name}.safetensors"
        if not main:
            return path
        tensors = {
            **checkpoint.pack_state("model", model.state_dict()),
            **checkpoint.pack_state("ema", ema.model.state_dict()),
            **{
                f"rng.{kind}.{r}": state
                for r, states in enumerate(rng_states)
                for kind, state in states.items()
            },
        }
        opt_tensors, opt_groups = checkpoint.optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta = {
            "config": cfg.to_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "ema_updates": ema.updates,
            "world_size": info.world_size,
            "optimizer": opt_groups,
            "components": components,
            "fmkit_version": fmkit_version,
        }
        return checkpoint.save(path, tensors, meta)

    def sample_grid(name: str) -> None:
        check_finite()
        if main:
            images = (
                FlowMatching(ema.model, flow.path).generate(grid_noise.to(device), grid_solver).x
            )
            visualize_samples(
                images, out / f"{name}.png", nrow=int(math.sqrt(cfg.num_samples)) or 1
            )

    # A non-finite loss or gradient norm is recorded on the device (the first bad step and its
    # value) and looked at only when the loop synchronises anyway (logs, grids, saves): a
    # Python `if` on a CUDA tensor every step would stall the CPU until the GPU caught up.
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # step number, 0: none
    bad_value = torch.zeros((), device=device)
    bad_is_loss = torch.zeros((), dtype=torch.bool, device=device)

    def record_finite(step_number: int, loss_value: torch.Tensor, norm: torch.Tensor) -> None:
        loss_ok, norm_ok = torch.isfinite(loss_value), torch.isfinite(norm)
        new = (first_bad == 0) & ~(loss_ok & norm_ok)
        first_bad.copy_(torch.where(new, step_number, first_bad))
        bad_value.copy_(torch.where(new, torch.where(loss_ok, norm, loss_value).float(), bad_value))
        bad_is_loss.copy_(torch.where(new, ~loss_ok, bad_is_loss))

    def check_finite() -> None:
        if (bad_step := int(first_bad.item())) == 0:
            return
        kept = (
            f"the last good checkpoint is {last_saved}"
            if last_saved
            else "no checkpoint was written yet"
        )
        what = "loss" if bad_is_loss.item() else "gradient norm"
        raise FmkitError(
            f"{what} became {bad_value.item()} at step {bad_step}; stopped at step {step}, {kept}"
        )

    def due(every: int | None, count: int) -> bool:
        return every is not None and every > 0 and count % every == 0

    # Train.
    bar = tqdm(
        total=total, initial=step, disable=not (progress and main), unit="step", dynamic_ncols=True
    )
    last_saved: Path | None = checkpoint.find_latest(out) if resume else None
    metrics = open(out / "metrics.jsonl", "a") if main else None
    board = _tensorboard(out) if main else None
    window_start, window_images = time.perf_counter(), 0
    done = cfg.max_steps is not None and step >= cfg.max_steps
    try:
        while not done and (cfg.max_steps is not None or epoch < cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch, batch_in_epoch)
            elif hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            batches = iter(loader)
            steps_this_epoch = 0
            while True:
                micro = list(itertools.islice(batches, cfg.grad_accum))
                have = len(micro) == cfg.grad_accum
                if iterable:  # shards may give ranks unequal counts: stop together
                    have = bool(distributed.all_min(int(have), info))
                if not have:
                    break
                # Noise and times for the whole global batch; this rank takes its slice, so a
                # step's draws do not depend on the number of processes.
                gen = step_generator(cfg.seed, step, device)
                noise = torch.randn((cfg.batch_size, *shape), generator=gen, device=device)
                times = sample_time(
                    cfg.batch_size,
                    cfg.time_sampling,
                    loc=cfg.time_loc,
                    scale=cfg.time_scale,
                    generator=gen,
                    device=device,
                )
                loss_sum = torch.zeros((), device=device)
                for m, batch in enumerate(micro):
                    x1 = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(
                        device, non_blocking=True
                    )
                    x1 = x1.contiguous(memory_format=memory_format)
                    lo = info.rank * local_batch + m * micro_batch
                    # Only the last micro-batch all-reduces. no_sync is asked of the DDP
                    # wrapper itself: a compiled module does not expose it.
                    sync = m == len(micro) - 1 or ddp is None
                    reduce = contextlib.nullcontext() if sync else ddp.no_sync()
                    with (
                        reduce,
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                    ):
                        loss = flow.loss(
                            x1,
                            noise=noise[lo : lo + micro_batch],
                            t=times[lo : lo + micro_batch],
                        )
                        (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach() / cfg.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf")
                )
                # Gradients are averaged over ranks, so a non-finite one stops every rank alike.
                record_finite(step + 1, loss_sum, grad_norm)
                lr = (
                    cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
                step += 1
                batch_in_epoch += 1
                steps_this_epoch += 1
                window_images += cfg.batch_size
                bar.update(1)

                # Log, sample and save on step intervals.
                if due(cfg.log_every, step):
                    check_finite()
                    loss_sum = distributed.mean(loss_sum, info)  # collective: every rank
                if main and due(cfg.log_every, step):
                    elapsed = time.perf_counter() - window_start
                    row = {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_sum.item(),
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "images_per_s": window_images / elapsed,
                    }
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if board is not None:
                        for key in ("loss", "lr", "grad_norm", "images_per_s"):
                            board.add_scalar(f"train/{key}", row[key], step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                    window_start, window_images = time.perf_counter(), 0
                if due(cfg.sample_every_steps, step):
                    sample_grid(f"samples_step_{step}")
                if due(cfg.save_every_steps, step):
                    last_saved = save(f"step_{step}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    done = True
                    break
            if done:
                break
            # Epoch finished: sample and save on epoch intervals.
            if steps_this_epoch == 0 and batch_in_epoch == 0:
                raise FmkitError(f"dataset '{cfg.dataset}' gave no full batch of {cfg.batch_size}")
            epoch += 1
            batch_in_epoch = 0
            if due(cfg.sample_every, epoch):
                sample_grid(f"samples_epoch_{epoch}")
            if due(cfg.save_every, epoch):
                last_saved = save(f"epoch_{epoch}")
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()
        if board is not None:
            board.close()

    # Save the final model and grid.
    final = save("final")
    sample_grid("final_samples_grid")
    return final

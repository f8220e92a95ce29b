"""The training loop: one function, in commented steps."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset, Sampler
from tqdm.auto import tqdm

from fmkit import __version__ as fmkit_version
from fmkit import checkpoint
from fmkit.config import TrainConfig
from fmkit.data import build_dataset, make_loader
from fmkit.errors import FmkitError
from fmkit.flow import FlowMatching, sample_time
from fmkit.plugins import plugin_info, registry
from fmkit.solver import build_solver
from fmkit.visualize import visualize_samples


class EMA:
    """Exponential moving average of a model's weights, with warm-up: update n (from 0) uses
    decay min(target, n / (n + 10)), so the first update copies the weights and early averages
    are not dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, self.updates / (self.updates + 10))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.updates += 1


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch) and can start mid-epoch, so a resumed
    run reads exactly the batches the uninterrupted run would have read."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.size, generator=gen)[self.start :].tolist()

    def __len__(self) -> int:
        return self.size - self.start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FmkitError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Noise and times of step `step` depend only on (seed, step): resumes are exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


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

    Outputs in `cfg.output`: config.json, checkpoint_epoch_N / checkpoint_step_N /
    checkpoint_final (.safetensors), samples_epoch_N / samples_step_N / final_samples_grid
    (.png, from the EMA weights) and metrics.jsonl.
    """
    out = Path(cfg.output)
    if not resume and any(out.glob("checkpoint_*.safetensors")):
        # Never overwrite an earlier run's checkpoints by accident.
        raise FmkitError(
            f"{out} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)

    # Build model, EMA, optimizer (first: a bad name or option fails before any download).
    model = (
        registry("backbones")
        .build(cfg.backbone, cfg.backbone_opts, image_size=cfg.image_size, channels=cfg.channels)
        .to(device)
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    flow = FlowMatching(
        torch.compile(model) if cfg.compile else model,
        registry("paths").build(cfg.path, cfg.path_opts),
        time_sampling=cfg.time_sampling,
    )
    # Load dataset.
    dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, "train", cfg.dataset_opts)
    iterable = isinstance(dataset, IterableDataset)
    sampler = None if iterable else EpochSampler(len(dataset), cfg.seed)
    loader = make_loader(
        dataset,
        cfg.batch_size,
        cfg.num_workers,
        sampler=sampler,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if not iterable and len(dataset) < cfg.batch_size:
        raise FmkitError(
            f"the dataset has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}"
        )

    step, epoch, batch_in_epoch = 0, 0, 0

    # Resume from the newest checkpoint in the run directory.
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
        torch.set_rng_state(tensors["rng.torch"])
        step, epoch, batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        ema.updates = meta["ema_updates"]
        print(f"resumed from {latest} at step {step} (epoch {epoch})")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    steps_per_epoch = None if iterable else len(dataset) // cfg.batch_size
    total = (
        cfg.max_steps
        if cfg.max_steps is not None
        else (steps_per_epoch * cfg.epochs if steps_per_epoch else None)
    )
    grid_noise = torch.randn(
        cfg.num_samples,
        cfg.channels,
        cfg.image_size,
        cfg.image_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    grid_solver = build_solver("euler", steps=cfg.sample_steps)

    def save(name: str) -> Path:
        tensors = {
            **checkpoint.pack_state("model", model.state_dict()),
            **checkpoint.pack_state("ema", ema.model.state_dict()),
            "rng.torch": torch.get_rng_state(),
        }
        opt_tensors, opt_groups = checkpoint.optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta = {
            "config": cfg.to_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "ema_updates": ema.updates,
            "optimizer": opt_groups,
            "components": {
                "backbone": component_info("backbones", cfg.backbone),
                "dataset": component_info("datasets", cfg.dataset),
                "path": component_info("paths", cfg.path),
            },
            "fmkit_version": fmkit_version,
        }
        return checkpoint.save(out / f"checkpoint_{name}.safetensors", tensors, meta)

    def sample_grid(name: str) -> None:
        generator = FlowMatching(ema.model, flow.path)
        images = generator.generate(grid_noise.to(device), grid_solver).x
        visualize_samples(images, out / f"{name}.png", nrow=int(math.sqrt(cfg.num_samples)) or 1)

    def due(every: int | None, count: int) -> bool:
        return every is not None and every > 0 and count % every == 0

    # Train.
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    last_saved: Path | None = checkpoint.find_latest(out) if resume else None
    metrics = open(out / "metrics.jsonl", "a")
    board = _tensorboard(out)
    window_start, window_images = time.perf_counter(), 0
    done = cfg.max_steps is not None and step >= cfg.max_steps
    try:
        while not done and (cfg.max_steps is not None or epoch < cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch, batch_in_epoch * cfg.batch_size)
            elif hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            batches_this_epoch = 0
            for batch in loader:
                batches_this_epoch += 1
                x1 = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(
                    device, non_blocking=True
                )
                if device.type == "cuda":
                    x1 = x1.contiguous(memory_format=torch.channels_last)
                gen = step_generator(cfg.seed, step)
                noise = torch.randn(x1.shape, generator=gen).to(device)
                t = sample_time(x1.shape[0], cfg.time_sampling, generator=gen).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = flow.loss(x1, noise=noise, t=t)
                if not torch.isfinite(loss):
                    kept = (
                        f"the last good checkpoint is {last_saved}"
                        if last_saved
                        else "no checkpoint was written yet"
                    )
                    raise FmkitError(
                        f"loss became {loss.item()} at step {step + 1}; stopped, {kept}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf")
                )
                lr = (
                    cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                ema.update(model)
                step += 1
                batch_in_epoch += 1
                window_images += x1.shape[0]
                bar.update(1)

                # Log, sample and save on step intervals.
                if due(cfg.log_every, step):
                    elapsed = time.perf_counter() - window_start
                    row = {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss.item(),
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
            else:
                # Epoch finished: sample and save on epoch intervals.
                if batches_this_epoch == 0 and batch_in_epoch == 0:
                    raise FmkitError(
                        f"dataset '{cfg.dataset}' gave no full batch of {cfg.batch_size}"
                    )
                epoch += 1
                batch_in_epoch = 0
                if due(cfg.sample_every, epoch):
                    sample_grid(f"samples_epoch_{epoch}")
                if due(cfg.save_every, epoch):
                    last_saved = save(f"epoch_{epoch}")
    finally:
        metrics.close()
        bar.close()
        if board is not None:
            board.close()

    # Save the final model and grid.
    final = save("final")
    sample_grid("final_samples_grid")
    return final

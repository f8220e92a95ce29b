"""Rebuilding a trained model from its checkpoint, and generating images with any solver."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from fmkit import checkpoint
from fmkit.config import TrainConfig
from fmkit.errors import FmkitError
from fmkit.flow import FlowMatching
from fmkit.plugins import registry
from fmkit.solver import Solver
from fmkit.visualize import to_unit, trajectory_strip, visualize_samples


def load_flow(
    path: Path, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[FlowMatching, TrainConfig, dict]:
    """(FlowMatching, config, metadata) from a checkpoint file or run directory. The backbone and
    path are rebuilt by name from the checkpoint; no architecture flags are needed."""
    path = checkpoint.resolve(path)
    tensors, meta = checkpoint.load(path)
    cfg = TrainConfig.from_dict(meta["config"])
    backbones = registry("backbones")
    if cfg.backbone not in backbones:
        source = meta.get("components", {}).get("backbone", {})
        dist = source.get("distribution", "unknown")
        raise FmkitError(
            f"{path} needs backbone '{cfg.backbone}', which is not installed; it came from the "
            f"distribution {dist} {source.get('version', '')}".rstrip()
            + f": pip install {dist}"
        )
    model: nn.Module = backbones.build(
        cfg.backbone, cfg.backbone_opts, image_size=cfg.image_size, channels=cfg.channels
    )
    model.load_state_dict(checkpoint.unpack_state("ema" if ema else "model", tensors))
    model.to(device).eval()
    flow = FlowMatching(model, registry("paths").build(cfg.path, cfg.path_opts))
    return flow, cfg, meta


@dataclass
class SampleReport:
    images: int
    nfe: list[int]  # per batch
    seconds: float


def sample_to_dir(
    flow: FlowMatching,
    solver: Solver,
    out: Path,
    num_samples: int,
    batch_size: int,
    image_size: int,
    channels: int,
    seed: int,
    trajectory: int = 0,
    log=print,
) -> SampleReport:
    """Generate `num_samples` images into `out`: grid.png, one PNG per sample and, with
    `trajectory` = K >= 2, trajectory.png (K states from noise to image for the first batch)."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    images, nfes = [], []
    device = flow.device
    start = time.perf_counter()
    batches = (num_samples + batch_size - 1) // batch_size
    for b in range(batches):
        n = min(batch_size, num_samples - b * batch_size)
        # Noise from a CPU generator: the same seed gives the same images on any device.
        noise = torch.randn(n, channels, image_size, image_size, generator=generator).to(device)
        times = torch.linspace(0, 1, trajectory) if trajectory >= 2 and b == 0 else None
        solution = flow.generate(noise, solver, times)
        if times is not None:
            trajectory_strip(solution.trajectory, out / "trajectory.png")
        images.append(solution.x.cpu())
        nfes.append(solution.nfe)
        log(f"batch {b + 1}/{batches}: {n} images, NFE {solution.nfe}")
    seconds = time.perf_counter() - start
    samples = torch.cat(images)
    visualize_samples(samples, out / "grid.png", nrow=max(1, int(num_samples**0.5)))
    for i, image in enumerate(to_unit(samples)):
        save_image(image, out / f"{i:05d}.png")
    return SampleReport(len(samples), nfes, seconds)

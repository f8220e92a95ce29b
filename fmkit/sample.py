"""`fmkit sample`: generate images from a trained model into a directory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from fmkit.folders import FolderKind, claim
from fmkit.generator import GUIDANCE, GUIDANCE_INTERVAL, Generator
from fmkit.pixels import to_unit
from fmkit.solver import Solver
from fmkit.visualize import trajectory_strip, visualize_samples


@dataclass
class SampleReport:
    images: int
    nfe: list[int]  # per batch
    seconds: float


def sample_to_dir(
    generator: Generator,
    solver: Solver,
    out: Path,
    num_samples: int,
    batch_size: int,
    seed: int,
    trajectory: int = 0,
    log=print,
    cond: Any = None,
    guidance: float = GUIDANCE,
    interval: tuple[float, float] = GUIDANCE_INTERVAL,
) -> SampleReport:
    """Generate `num_samples` images into `out`: grid.png, one PNG per sample and, with
    `trajectory` = K >= 2, trajectory.png (K states from noise to image for the first batch).
    `cond`, `guidance` and `interval` are as in `Generator.sample`. A folder of earlier
    samples is replaced; any other non-empty folder is refused before sampling starts."""
    folder = claim(out, SAMPLES)
    names = ["grid.png", *(f"{i:05d}.png" for i in range(num_samples))]
    names += ["trajectory.png"] if trajectory >= 2 else []
    images, nfes = [], []
    batches = (num_samples + batch_size - 1) // batch_size
    start = time.perf_counter()
    stream = generator.batches(
        num_samples, solver=solver, batch_size=batch_size, seed=seed, cond=cond,
        trajectory=trajectory, guidance=guidance, interval=interval,
    )  # fmt: skip
    for b, (x, solution) in enumerate(stream):
        if b == 0:  # the first batch worked: now the folder is written
            folder.add(*names)
        if trajectory >= 2 and b == 0:
            trajectory_strip(solution.trajectory, out / "trajectory.png")
        images.append(x)
        nfes.append(solution.nfe)
        log(f"batch {b + 1}/{batches}: {len(x)} images, NFE {solution.nfe}")
    seconds = time.perf_counter() - start
    samples = torch.cat(images)
    visualize_samples(samples, out / "grid.png", nrow=max(1, int(num_samples**0.5)))
    for i, image in enumerate(to_unit(samples)):
        save_image(image, out / f"{i:05d}.png")
    folder.retire(keep=names)  # an earlier, larger batch of samples leaves no strays
    return SampleReport(len(samples), nfes, seconds)


# Samples: a folder of PNGs from before folders were marked could be anyone's, so it is
# never taken for fmkit's (its files would be replaced and the extra ones removed).
SAMPLES = FolderKind("samples", "samples", "fmkit sample")

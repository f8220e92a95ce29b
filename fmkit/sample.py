"""`fmkit sample`: generate images from a trained model into a directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmkit.folders import FolderKind, claim
from fmkit.generator import Generator
from fmkit.progress import SamplingBar
from fmkit.solver import Solver
from fmkit.visualize import save_png, trajectory_strip, visualize_samples


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
    guidance: float | None = None,
    interval: tuple[float, float] | None = None,
) -> SampleReport:
    """Generate `num_samples` images into `out`: grid.png, one PNG per sample and, with
    `trajectory` = K >= 2, trajectory.png (K states from noise to image for the first batch).
    `cond`, `guidance` and `interval` are as in `Generator.sample`. A folder of earlier
    samples is replaced; any other non-empty folder is refused before sampling starts."""
    folder = claim(out, SAMPLES)
    names = ["grid.png", *(f"{i:05d}.png" for i in range(num_samples))]
    names += ["trajectory.png"] if trajectory >= 2 else []
    batches = (num_samples + batch_size - 1) // batch_size
    done = []

    with SamplingBar(num_samples, "sampling") as bar:  # within a batch too: its NFE

        def progress(x, solution) -> None:
            if not done:  # the first batch worked: now the folder is written
                folder.add(*names)
            done.append(len(x))
            bar.update(len(x))
            log(f"batch {len(done)}/{batches}: {len(x)} images, NFE {solution.nfe}")

        samples = generator.sample(
            num_samples, cond, solver, seed=seed, batch_size=batch_size, trajectory=trajectory,
            guidance=guidance, interval=interval, progress=progress, watch=bar.watch,
        )  # fmt: skip
    if trajectory >= 2:
        trajectory_strip(samples.trajectory, out / "trajectory.png")
    visualize_samples(samples.images, out / "grid.png", nrow=max(1, int(num_samples**0.5)))
    for i, image in enumerate(samples.images):
        save_png(image, out / f"{i:05d}.png")
    folder.retire(keep=names)  # an earlier, larger batch of samples leaves no strays
    return SampleReport(len(samples.images), samples.nfe, samples.seconds)


# Samples: a folder of PNGs from before folders were marked could be anyone's, so it is
# never taken for fmkit's (its files would be replaced and the extra ones removed).
SAMPLES = FolderKind("samples", "samples", "fmkit sample")

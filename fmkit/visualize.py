"""Sample grids and image files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from fmkit.batch import Condition
from fmkit.pixels import to_uint8


def save_png(images: Tensor, path: Path, nrow: int = 8, padding: int = 2) -> None:
    """(N, C, H, W) or (C, H, W) floats in [-1, 1] -> one PNG: a grid of `nrow` images a row
    with `padding` black pixels around each (torchvision's make_grid layout; one image alone
    has no border). Pixels go through `pixels.to_uint8`, so a saved sample loads back as the
    exact 8-bit image. Written with PIL: importing torchvision would add seconds to every
    command's start (it imports the compiler stack)."""
    pixels = to_uint8(images.detach().cpu())
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.shape[1] == 1:  # grey -> RGB, as make_grid does
        pixels = pixels.expand(-1, 3, -1, -1)
    n, c, h, w = pixels.shape
    if n == 1:
        grid = pixels[0]
    else:
        cols = min(nrow, n)
        rows = math.ceil(n / cols)
        grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding,
                           dtype=torch.uint8)  # fmt: skip
        for i, image in enumerate(pixels):
            top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
            grid[:, top : top + h, left : left + w] = image
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path)


def visualize_samples(samples: Tensor, save_path: str | Path, nrow: int = 8) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one grid PNG (the seed's API)."""
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(samples, path, nrow=nrow)
    return path


def trajectory_strip(trajectory: Tensor, save_path: str | Path) -> Path:
    """(K, N, C, H, W) states -> one PNG: a row per sample, K columns from noise to image."""
    k, n = trajectory.shape[:2]
    rows = trajectory.transpose(0, 1).reshape(n * k, *trajectory.shape[2:])
    path = Path(save_path)
    save_png(rows, path, nrow=k)
    return path


@dataclass
class GridLayout:
    """A training grid: `columns` images a row; for a conditional model, each row's
    (caption, what it asks for), rows * columns images in all."""

    columns: int
    rows: list[tuple[str, dict]] | None = None

    def conditions(self) -> list[dict] | None:
        """One condition per image, row after row (None: unconditional)."""
        if self.rows is None:
            return None
        return [asked for _, asked in self.rows for _ in range(self.columns)]

    def captions(self) -> str:
        return "".join(f"row {r + 1}: {caption}\n" for r, (caption, _) in enumerate(self.rows))


def grid_layout(condition: Condition, num_samples: int) -> GridLayout:
    """How a training grid of about `num_samples` images is laid out: square-ish; for a
    conditional model one condition per row (the condition kind's choice, so control can be
    watched as it emerges). A kind with few states (K classes) gets a row for every one when
    K <= num_samples, so no class is left out: K rows of num_samples // K."""
    from fmkit.conditions import condition_kind

    columns = int(math.sqrt(num_samples)) or 1
    if condition.kind == "none":
        return GridLayout(columns)
    kind = condition_kind(condition.kind)
    rows = math.ceil(num_samples / columns)
    states = kind.states(condition)
    if states is not None and rows < len(states) <= num_samples:
        rows, columns = len(states), num_samples // len(states)
    return GridLayout(columns, kind.grid_rows(condition, rows))


def training_grid(
    generator, num_samples: int, steps: int | None, seed: int, png: Path, captions: Path
) -> None:
    """A training run's grid: `num_samples` images (laid out by `grid_layout`) from `seed`'s
    noise with the model's own sampler (`steps` of it, unset: the model's), into `png`; a
    conditional model's row captions into `captions`."""
    solver = generator.defaults.solver_for(steps=steps).solver
    layout = grid_layout(generator.data.condition, num_samples)
    cond, count = layout.conditions(), num_samples
    if cond is not None:  # one condition per row, captioned
        cond, count = cond[:count], min(count, len(cond))
        captions.write_text(layout.captions())
    samples = generator.sample(count, cond=cond, solver=solver, seed=seed, batch_size=count)
    visualize_samples(samples.images, png, nrow=layout.columns)

"""Sample grids and image files."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torchvision.utils import save_image

from fmkit.batch import Condition
from fmkit.pixels import to_unit


def visualize_samples(samples: Tensor, save_path: str | Path, nrow: int = 8) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one grid PNG (the seed's API)."""
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(to_unit(samples), path, nrow=nrow, padding=2)
    return path


def trajectory_strip(trajectory: Tensor, save_path: str | Path) -> Path:
    """(K, N, C, H, W) states -> one PNG: a row per sample, K columns from noise to image."""
    k, n = trajectory.shape[:2]
    rows = trajectory.transpose(0, 1).reshape(n * k, *trajectory.shape[2:])
    path = Path(save_path)
    save_image(to_unit(rows), path, nrow=k, padding=2)
    return path


def grid_conditions(condition: Condition, rows: int) -> list[tuple[str, dict]]:
    """What each row of a training grid shows, so control can be watched as it emerges (the
    condition kind's choice, e.g. one class per row). Returns (caption, conditions) per row."""
    from fmkit.conditions import condition_kind

    return condition_kind(condition.kind).grid_rows(condition, rows)

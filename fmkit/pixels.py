"""Pixel conversions, in one place: 8-bit images and the float tensors in [-1, 1] models see.

Pixel value k (0..255) is the float k / 127.5 - 1; a float x goes back to round((x + 1) * 127.5),
clamped to 0..255. Datasets, the prepared cache, saved PNGs, FID's uint8 input and bits/dim all
use these two maps, so a round trip is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_float(pixels: np.ndarray | Tensor | Image.Image) -> Tensor:
    """(..., H, W, 3) uint8 pixels -> (..., 3, H, W) float32 in [-1, 1]."""
    if isinstance(pixels, Image.Image):
        pixels = np.asarray(pixels, dtype=np.uint8)
    if isinstance(pixels, np.ndarray):
        if not pixels.flags.writeable:  # e.g. a decoded PIL image's buffer
            pixels = pixels.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    return pixels.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """(..., C, H, W) floats in [-1, 1] -> uint8 of the same layout, as a PNG stores them."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pixels(image: Tensor) -> np.ndarray:
    """One (C, H, W) float image in [-1, 1] -> (H, W, C) uint8 array (the cache's layout)."""
    return to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()


def pil_pixels(image: Image.Image) -> np.ndarray:
    """A decoded RGB image as (H, W, 3) uint8."""
    return np.asarray(image, dtype=np.uint8)

"""Image helpers every dataset plugin shares: decode, crop, resize, and map to [-1, 1]."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fmkit.batch import Condition, DataSpec
from fmkit.pixels import pil_pixels, to_float

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# A crop box: (left, top, right, bottom) in pixels, or None for the largest centred square.
Box = tuple[int, int, int, int]


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file or bytes to an RGB image (grayscale, palette and RGBA converted)."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decode now, so truncated files fail here and not later
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto white rather than letting the alpha channel drop to black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(width: int, height: int, size: int | None = None) -> Box:
    """The centred square of side `size` (default: the shorter side)."""
    size = min(width, height) if size is None else size
    left, top = (width - size) // 2, (height - size) // 2
    return (left, top, left + size, top + size)


def crop_resize(image: Image.Image, box: Box | None, size: int) -> Image.Image:
    """Crop `box` (None: centred square) and resize to size x size with antialiasing."""
    box = center_square(*image.size) if box is None else box
    # Crop first (as torchvision's CenterCrop + Resize): pixels outside the box never leak in.
    # PIL's bicubic resize widens its filter when shrinking, so it is antialiased.
    return image.crop(box).resize((size, size), Image.BICUBIC)


def find_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in a stable (sorted) order."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


class ImageFileDataset(torch.utils.data.Dataset):
    """Images read from files, cropped, resized and mapped to [-1, 1].

    Args:
        files: image paths.
        image_size: output side length.
        box: crop box applied before resizing (None: centred square of each image).
        labels: optional (N,) or (N, K) tensor; items become (image, label) when given.
        split: the split these files are ("train", "test", ...); None when the source has no
            splits (evaluation says so rather than pretend to score held-out images).
        condition: what `labels` are (a fmkit.Condition: their kind and names).

    Items are (3, image_size, image_size) float tensors, or (image, label) tuples. Random
    flips are the training loop's business (drawn per sample from the step's seed), not the
    dataset's.
    """

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int,
        box: Box | None = None,
        labels: Tensor | None = None,
        split: str | None = None,
        condition: Condition | None = None,
    ) -> None:
        self.files = list(files)
        self.split = split
        self.image_size = image_size
        self.box = box
        self.labels = labels
        self.condition = condition if labels is not None and condition else Condition()

    def describe(self) -> DataSpec:
        return DataSpec(3, self.image_size, self.condition)

    def __len__(self) -> int:
        return len(self.files)

    def cache_key(self) -> dict:
        """What the decoded pixels depend on: the files (path, size, modification time), the
        crop, the size and the labels. fmkit caches decoded copies under this key."""
        stats = []
        for f in self.files:
            st = os.stat(f)
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        labels = None
        if self.labels is not None:
            labels = hashlib.sha1(self.labels.numpy().tobytes()).hexdigest()
        files = hashlib.sha1(json.dumps(stats).encode()).hexdigest()
        return {"files": files, "box": self.box, "image_size": self.image_size, "labels": labels}

    def pixels(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 pixels of item `index`, cropped and resized."""
        path = self.files[index]
        try:
            image = open_rgb(path)
        except Exception as exc:
            raise OSError(f"cannot read image {path}: {exc}") from None
        return pil_pixels(crop_resize(image, self.box, self.image_size))

    def __getitem__(self, index: int):
        image = to_float(self.pixels(index))
        return image if self.labels is None else (image, self.labels[index])

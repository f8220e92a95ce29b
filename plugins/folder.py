"""The `folder` dataset: every image under a directory (the seed's `face_folder`)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from fmkit import FmkitError, hookimpl
from fmkit.images import IMAGE_EXTENSIONS, ImageFileDataset, find_images

logger = logging.getLogger("fmkit")


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (8, 8))  # JPEG: decode at 1/8 scale, still reads every byte
            image.load()
        return True
    except Exception:
        return False


def scan(root: Path, verify: bool = True) -> list[Path]:
    """Image files under `root`, without the unreadable ones (one warning counts them)."""
    if not root.is_dir():
        raise FmkitError(f"image folder {root} does not exist")
    files = find_images(root)
    if not files:
        raise FmkitError(
            f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    if verify:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(_readable, files))
        bad = [f for f, good in zip(files, ok, strict=True) if not good]
        if bad:
            names = ", ".join(str(p.relative_to(root)) for p in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            logger.warning(
                "fmkit: warning: skipping %d unreadable image(s) in %s: %s%s",
                len(bad),
                root,
                names,
                more,
            )
            files = [f for f, good in zip(files, ok, strict=True) if good]
        if not files:
            raise FmkitError(f"no readable images in {root}")
    return files


def folder(
    *, root: str, image_size: int, split: str = "train", verify: bool = True
) -> ImageFileDataset:
    """Every image under --data-dir, recursively (jpg/png/webp/bmp); center crop + resize.

    Options:
        verify: decode every file once up front and skip unreadable ones.
    """
    # A folder has no official partition: every split is the whole folder (split=None says so).
    return ImageFileDataset(scan(Path(root), verify), image_size, box=None, split=None)


@hookimpl
def register_datasets(register):
    register("folder", folder)

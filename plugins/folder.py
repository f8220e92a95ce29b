"""The `folder` dataset: every image under a directory (the seed's `face_folder`)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from fmkit import FmkitError, hookimpl
from fmkit.batch import Condition
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
    *,
    root: str,
    image_size: int,
    split: str = "train",
    condition: Literal["none", "class"] = "none",
    verify: bool = True,
) -> ImageFileDataset:
    """Every image under --data-dir, recursively (jpg/png/webp/bmp); center crop + resize.

    Options:
        verify: decode every file once up front and skip unreadable ones.

    With condition="class" (fmkit train --condition class) each subfolder of --data-dir is a
    class, named after it, and items are (image, class index).
    """
    root_path = Path(root)
    files = scan(root_path, verify)
    labels, classes = None, None
    if condition == "class":
        classes = sorted(
            {f.relative_to(root_path).parts[0] for f in files if f.parent != root_path}
        )
        loose = [f.name for f in files if f.parent == root_path]
        if not classes or loose:
            raise FmkitError(
                f"--condition class needs one subfolder per class in {root} "
                + (f"(found images outside them, e.g. {loose[0]})" if loose else "(found none)")
            )
        index = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([index[f.relative_to(root_path).parts[0]] for f in files])
    # A folder has no official partition: every split is the whole folder (split=None says so).
    return ImageFileDataset(
        files,
        image_size,
        box=None,
        labels=labels,
        split=None,
        condition=Condition("class", tuple(classes)) if classes else None,
    )


@hookimpl
def register_datasets(register):
    register("folder", folder)

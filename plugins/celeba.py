"""The `celeba` dataset (Liu et al. 2015, "Deep Learning Face Attributes in the Wild"):
202,599 aligned 178x218 faces, the official train/valid/test partition and 40 attributes,
downloaded on first use."""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fmkit import FmkitError, hookimpl
from fmkit.batch import Condition
from fmkit.data import build_dataset, make_loader
from fmkit.download import DownloadError, download, md5sum, unreachable
from fmkit.images import Box, ImageFileDataset, center_square
from fmkit.registry import unknown_name_message


@dataclass(frozen=True)
class CelebAFile:
    name: str  # file name under <data-dir>/celeba/
    gdrive_id: str  # id of the official Google Drive file
    md5: str


FILES = (
    CelebAFile(
        "img_align_celeba.zip", "0B7EVK8r0v71pZjFTYXZWM3FlRnM", "00d2c5bc6d35e252742224ab0c1e8fcb"
    ),
    CelebAFile(
        "list_eval_partition.txt",
        "0B7EVK8r0v71pY0NSMzRuSXJEVkk",
        "d32c9cbf5e040fd4025c592c306e6668",
    ),
    CelebAFile(
        "list_attr_celeba.txt", "0B7EVK8r0v71pblRyaVFSWGxPY0U", "75e246fa4810816ffd6ee81facbd244c"
    ),
)
IMAGES_DIR = "img_align_celeba"
GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
HF_MIRROR = "Yuehao/celeba"  # dataset repo holding the official files (checked by MD5)
SPLITS = {"train": 0, "valid": 1, "test": 2}
WIDTH, HEIGHT = 178, 218

# Crop boxes (left, top, right, bottom) on the 178x218 aligned images.
CROPS: dict[str, Box] = {
    "ddim": (25, 57, 153, 185),  # 128x128 centred at x=89, y=121 (DDIM, Song et al. 2021)
    "center140": center_square(WIDTH, HEIGHT, 140),  # NCSN / score-SDE
    "full": center_square(WIDTH, HEIGHT, WIDTH),  # the whole width, centred
}


def _valid(path: Path, md5: str) -> bool:
    return path.is_file() and md5sum(path) == md5


def _sources(mirror_url: str | None, hf_endpoint: str | None) -> dict[str, str]:
    """label -> base URL of each place the files may come from, in the order they are tried."""
    if mirror_url:
        return {"mirror": mirror_url.rstrip("/")}
    from huggingface_hub import constants

    return {"Google Drive": GDRIVE_URL, "Hugging Face": hf_endpoint or constants.ENDPOINT}


def _fetch(label: str, base: str, spec: CelebAFile, dest: Path, hf_repo: str, revision: str):
    if label == "Google Drive":
        download(base.format(id=spec.gdrive_id), dest, spec.md5)
    elif label == "Hugging Face":
        _from_hub(spec, dest, hf_repo, revision, base)
    else:
        download(f"{base}/{spec.name}", dest, spec.md5)


def _from_hub(spec: CelebAFile, dest: Path, repo: str, revision: str, endpoint: str) -> None:
    # hf_hub_download honours HF_HUB_OFFLINE and reuses the hub cache.
    from huggingface_hub import hf_hub_download

    cached = Path(
        hf_hub_download(repo, spec.name, repo_type="dataset", revision=revision, endpoint=endpoint)
    )
    if md5sum(cached) != spec.md5:
        raise DownloadError(f"{spec.name} from {repo}@{revision} does not match the official MD5")
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(cached, part)
    part.replace(dest)


def prepare_files(
    folder: Path,
    download_missing: bool,
    mirror_url: str | None,
    hf_repo: str,
    hf_revision: str,
    hf_endpoint: str | None = None,
) -> None:
    """Make sure the partition, attributes and extracted images are in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images_ready = (folder / IMAGES_DIR).is_dir()
    needed = [f for f in FILES if not (images_ready and f.name.endswith(".zip"))]
    missing = [f for f in needed if not _valid(folder / f.name, f.md5)]
    for spec in missing:  # present but not the official file: a user's, never overwritten
        if (folder / spec.name).is_file():
            raise FmkitError(
                f"{folder / spec.name} is not the official {spec.name}: its MD5 is "
                f"{md5sum(folder / spec.name)}, the official one {spec.md5}; replace it with "
                "the file from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or remove it "
                "to download it"
            )
    if missing and not download_missing:
        raise FmkitError(_manual_help(folder, "downloading is turned off (download=False)"))
    if missing:
        sources = _sources(mirror_url, hf_endpoint)
        # One short reason per source. A host that cannot be reached is not asked again for
        # each file (the hub cache still answers offline when HF_HUB_OFFLINE is set).
        probed = {k: v for k, v in sources.items() if not (k == "Hugging Face" and _hub_offline())}
        dead = unreachable(list(probed.values()))
        failures = {label: dead[url] for label, url in probed.items() if url in dead}
        alive = {label: base for label, base in sources.items() if label not in failures}
        for spec in missing:
            for label, base in alive.items():
                try:
                    _fetch(label, base, spec, folder / spec.name, hf_repo, hf_revision)
                    break
                except Exception as exc:  # DownloadError, hub client errors (offline, 404, ...)
                    failures.setdefault(label, _short(exc))
        if any(not _valid(folder / f.name, f.md5) for f in missing):
            reasons = "; ".join(f"{label}: {why}" for label, why in failures.items())
            raise FmkitError(_manual_help(folder, reasons))
    if not images_ready:
        _extract(folder / FILES[0].name, folder)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, DownloadError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 160 else text[:157] + "..."


def _extract(archive: Path, folder: Path) -> None:
    # Extract next to the target and rename at the end: an interrupted extraction never leaves
    # a half-filled img_align_celeba/ that would later pass for complete.
    staging = folder / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(staging)
    (staging / IMAGES_DIR).replace(folder / IMAGES_DIR)
    shutil.rmtree(staging, ignore_errors=True)


def _manual_help(folder: Path, reason: str) -> str:
    names = ", ".join(f.name for f in FILES)
    return (
        f"could not get CelebA ({reason}). Put {names} from "
        f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html in {folder.resolve()}/ (MD5-checked)"
    )


def read_partition(path: Path) -> dict[str, int]:
    """image name -> 0 (train), 1 (valid) or 2 (test)."""
    parts = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, split = line.split()
            parts[name] = int(split)
    return parts


def read_attributes(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and image name -> 40 values in {0, 1} (the file stores -1 / 1)."""
    lines = path.read_text().splitlines()
    names = lines[1].split()
    values = {}
    for line in lines[2:]:
        if line.strip():
            image, *row = line.split()
            values[image] = [int(v == "1") for v in row]
    return names, values


class CelebA(ImageFileDataset):
    """CelebA aligned faces with the official partition; `attributes` names the 40 labels."""

    attributes: list[str]


def celeba(
    *,
    root: str,
    image_size: int,
    split: Literal["train", "valid", "test", "all"] = "train",
    condition: Literal["none", "attributes"] = "none",
    attributes: tuple[str, ...] | None = None,
    crop: Literal["ddim", "center140", "full"] = "ddim",
    download: bool = True,
    mirror_url: str | None = None,
    hf_repo: str = HF_MIRROR,
    hf_revision: str = "main",
    hf_endpoint: str | None = None,
) -> CelebA:
    """CelebA faces, downloaded on first use into DATA_DIR/celeba (official partition).

    Options:
        split: train (162,770), valid (19,867), test (19,962) or all.
        crop: ddim (128x128 at x=89, y=121), center140, or full (centred 178x178).
        download: fetch missing files; mirror_url: fetch BASE/<file name> instead.
        hf_repo, hf_revision, hf_endpoint: the Hugging Face copy tried after Google Drive
            (endpoint default: $HF_ENDPOINT, else huggingface.co).

    With condition="attributes" (fmkit train --condition attributes) items are (image, the 40
    attributes in {0, 1}), or only those named by `attributes` (Smiling,Eyeglasses,Male).
    """
    folder = Path(root) / "celeba"
    prepare_files(folder, download, mirror_url, hf_repo, hf_revision, hf_endpoint)
    partition = read_partition(folder / "list_eval_partition.txt")
    names = sorted(n for n, s in partition.items() if split == "all" or s == SPLITS[split])
    images = folder / IMAGES_DIR
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise FmkitError(
            f"{len(missing)} CelebA images of the {split} split are missing from {images} "
            f"(first: {missing[0]}); delete the folder to extract it again"
        )
    attr_names, attrs = read_attributes(folder / "list_attr_celeba.txt")
    chosen = list(attributes) if attributes else attr_names
    for name in chosen:
        if name not in attr_names:
            raise FmkitError(unknown_name_message("CelebA attribute", name, attr_names))
    columns = [attr_names.index(name) for name in chosen]
    labels = None
    if condition == "attributes":
        table = torch.tensor([attrs[n] for n in names], dtype=torch.long)  # (N, 40)
        labels = table[:, columns]
    dataset = CelebA(
        [images / n for n in names],
        image_size,
        CROPS[crop],
        labels,
        split=split,
        condition=Condition("attributes", tuple(chosen)),
    )
    dataset.attributes = attr_names
    return dataset


def load_celeba_data(
    batch_size: int = 32,
    data_dir: str = "./data",
    image_size: int = 64,
    split: str = "train",
    num_workers: int = 0,
    flip: bool = True,
    labels: bool = False,
    **options: Any,
) -> DataLoader:
    """The seed's loader: CelebA (downloaded on first use) batched as (B, 3, S, S) in [-1, 1].

    `flip` mirrors training images at random, `labels` adds the 40 attributes (batches are then
    (images, attributes)); other options (crop, download, ...) are the `celeba` dataset's.
    """
    condition = "attributes" if labels else "none"  # the `attributes` condition kind
    data = build_dataset("celeba", data_dir, image_size, split, options, condition)
    if flip and split == "train":
        data = RandomFlips(data)
    return make_loader(data, batch_size, num_workers, shuffle=split == "train")


class RandomFlips(Dataset):
    """Items of `dataset` mirrored with probability 1/2 (the seed loader's augmentation; fmkit
    train flips per sample from the step's seed instead)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image, *item[1:]) if isinstance(item, tuple) else image


@hookimpl
def register_datasets(register):
    register("celeba", celeba)

"""Images/s delivered to the training loop at 64x64: folder of JPEGs vs prepared array vs
WebDataset shards, with 0 and 2 DataLoader workers, on CelebA-sized (178x218) JPEGs this
script writes. Run: python benchmarks/loader.py [--images 4000] [--batch-size 256]."""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmkit.data import build_dataset, make_loader
from fmkit.prepared import write_array


def write_jpegs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (28, 23, 3), dtype=np.uint8)
    for i in range(count):
        # Smooth, face-sized content so JPEG sizes resemble CelebA's (~10 KB), not noise.
        tile = np.roll(base, i, axis=0)
        image = Image.fromarray(tile).resize((178, 218), Image.BILINEAR)
        image.save(root / f"{i:06d}.jpg", quality=90)


def write_shards(src: Path, out: Path, per_shard: int = 1000) -> None:
    import webdataset as wds

    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, path in enumerate(sorted(src.glob("*.jpg"))):
            sink.write({"__key__": f"{i:06d}", "jpg": path.read_bytes(), "cls": 0})


def measure(dataset, batch_size: int, workers: int, min_images: int) -> float:
    loader = make_loader(dataset, batch_size, num_workers=workers, drop_last=False)
    seen, start = 0, None
    while seen < min_images:
        for batch in loader:
            if start is None:  # exclude worker start-up and the first batch
                start = time.perf_counter()
                continue
            seen += batch.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "jpegs").mkdir()
        write_jpegs(tmp / "jpegs", args.images)
        folder = build_dataset("folder", str(tmp / "jpegs"), args.image_size)
        write_array(folder, tmp / "prepared", {"dataset": "folder"}, progress=False)
        write_shards(tmp / "jpegs", tmp / "shards")
        sources = {
            "folder (JPEG decode)": folder,
            "prepared (uint8 memmap)": build_dataset(
                "prepared", str(tmp / "prepared"), args.image_size
            ),
            "imagenet (WebDataset shards)": build_dataset(
                "imagenet", str(tmp / "shards"), args.image_size
            ),
        }
        print(
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
            f"{args.images} images 178x218 -> {args.image_size}x{args.image_size}, batch {args.batch_size}"
        )
        print("| loader | workers | images/s |")
        print("| --- | --- | --- |")
        for name, dataset in sources.items():
            for workers in (0, 2):
                rate = measure(dataset, args.batch_size, workers, min_images=args.images)
                print(f"| {name} | {workers} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

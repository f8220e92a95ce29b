"""Training throughput of `fmkit train` against a bare hand-written PyTorch loop on the same
model, batch and data, in one run. Prints images/s of each and their ratio.

Run: python benchmarks/train_step.py [--steps 60] [--batch-size 32] [--image-size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmkit.config import TrainConfig
from fmkit.data import build_dataset, make_loader
from fmkit.plugins import registry
from fmkit.prepared import write_array
from fmkit.train import train

UNET = {"base_channels": 32, "channel_mult": (1, 2, 2), "attn_resolutions": (8,), "dropout": 0.0}


def bare_loop(data_dir: Path, args) -> float:
    """The minimal flow-matching step: no EMA, no clipping, no logging."""
    torch.manual_seed(0)
    model = registry("backbones").build("unet", UNET, image_size=args.image_size, channels=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = make_loader(build_dataset("prepared", str(data_dir), args.image_size), args.batch_size)
    done, start, images = 0, None, 0
    while done < args.steps:
        for x1 in loader:
            if done == args.warmup:
                start, images = time.perf_counter(), 0
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0])
            tt = t.view(-1, 1, 1, 1)
            loss = ((model(tt * x1 + (1 - tt) * x0, t) - (x1 - x0)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            images += x1.shape[0]
            if done == args.steps:
                break
    return images / (time.perf_counter() - start)


def fmkit_loop(data_dir: Path, out: Path, args) -> float:
    cfg = TrainConfig(
        dataset="prepared",
        data_dir=str(data_dir),
        image_size=args.image_size,
        batch_size=args.batch_size,
        max_steps=args.steps,
        backbone_opts=dict(UNET),
        log_every=args.steps - args.warmup,
        save_every=None,
        sample_every=None,
        num_samples=1,
        sample_steps=1,
        output=str(out),
        device="cpu",
    )
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]  # one row per step after warm-up
    seconds = sum(args.batch_size / r["images_per_s"] for r in timed)
    return len(timed) * args.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        rng = np.random.default_rng(0)
        for i in range(512):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp / "img" / f"{i}.png"
            )
        folder = build_dataset("folder", str(tmp / "img"), args.image_size, options={"flip": False})
        write_array(folder, tmp / "prepared", {"dataset": "folder"}, progress=False)
        # Alternate the two and keep each one's best, so drift of the machine hits both.
        bare, ours = 0.0, 0.0
        for r in range(args.repeats):
            bare = max(bare, bare_loop(tmp / "prepared", args))
            ours = max(ours, fmkit_loop(tmp / "prepared", tmp / f"run{r}", args))
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, UNet {UNET}, "
        f"batch {args.batch_size} at {args.image_size}x{args.image_size}, steps {args.warmup + 1}..{args.steps}"
    )
    print(f"bare PyTorch loop: {bare:.1f} images/s (best of {args.repeats})")
    print(f"fmkit train:       {ours:.1f} images/s (best of {args.repeats})")
    print(f"ratio:             {ours / bare:.3f}")


if __name__ == "__main__":
    main()

"""Training throughput of `fmkit train` against a bare hand-written PyTorch loop on the same
model, batch, data and device, in one run. Prints images/s of each and their ratio.

Run: python benchmarks/train_step.py [--steps 50] [--batch-size 32] [--image-size 32]
     [--device cuda --precision bf16 --compile]   (benchmarks/gpu.py runs it on a GPU)

Both loops are timed over the same steps after `--warmup` steps (compilation, cuDNN autotuning,
allocator warm-up). The trainer is read from metrics.jsonl: logging every `--warmup` steps, each
line after the first covers exactly that many steps between two synchronisations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmkit.config import TrainConfig
from fmkit.data import build_dataset, make_loader
from fmkit.device import choose, resolve_device
from fmkit.plugins import registry
from fmkit.prepared import write_array
from fmkit.train import train

UNET = {"base_channels": 32, "channel_mult": (1, 2, 2), "attn_resolutions": (8,), "dropout": 0.0}


def synthetic_prepared(root: Path, image_size: int, count: int = 512) -> Path:
    """A prepared array of `count` random images (written through a folder, like a user's)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (image_size + 8, image_size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
    folder = build_dataset("folder", str(root / "img"), image_size)
    return write_array(folder, root / "prepared", {"dataset": "folder"}, progress=False)


@dataclass
class Settings:
    """What both loops run: the same model, batch, data and device."""

    steps: int = 50  # timed steps
    warmup: int = 10  # steps before timing; also the trainer's metrics window
    batch_size: int = 32
    image_size: int = 32
    unet: dict = field(default_factory=lambda: dict(UNET))
    device: str = "cpu"
    precision: str = "fp32"  # or "bf16"; the trainer also takes "auto" (bf16 on CUDA)
    compile: bool | None = False  # None: fmkit's default (on CUDA)
    num_workers: int = 0
    channels_last: bool | None = None  # None: fmkit's default (on CUDA)
    mode: str | None = None  # torch.compile's mode for the bare loop: "reduce-overhead", ...


def bare_loop(data_dir: Path, s: Settings) -> float:
    """The minimal flow-matching step: no EMA, no clipping, no logging. Uses what fmkit uses on
    the device (fmkit.device.choose: channels_last, fused AdamW, compile and TF32 on CUDA, bf16
    autocast when asked), and `s.mode` for torch.compile (e.g. CUDA graphs)."""
    dev = resolve_device(s.device)
    cuda = dev.type == "cuda"
    fast = choose(dev, s.precision, s.channels_last, None, s.compile)
    torch.manual_seed(0)
    model = registry("backbones").build("unet", s.unet, image_size=s.image_size, channels=3)
    model = model.to(dev, memory_format=fast.memory_format)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fast.fused_adamw)
    net = torch.compile(model, mode=s.mode) if fast.compile else model
    data = build_dataset("prepared", str(data_dir), s.image_size)
    loader = make_loader(data, s.batch_size, s.num_workers, pin_memory=cuda)
    done, start, images = 0, 0.0, 0
    while done < s.warmup + s.steps:
        for x1 in loader:
            if done == s.warmup:
                if cuda:
                    torch.cuda.synchronize()
                start, images = time.perf_counter(), 0
            x1 = x1.to(dev, non_blocking=True).contiguous(memory_format=fast.memory_format)
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0], device=dev)
            tt = t.view(-1, 1, 1, 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=fast.bf16):
                predicted = net(tt * x1 + (1 - tt) * x0, t)
            loss = ((predicted.float() - (x1 - x0)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            images += x1.shape[0]
            if done == s.warmup + s.steps:
                break
    if cuda:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def fmkit_loop(data_dir: Path, out: Path, s: Settings) -> float:
    """`fmkit train` on the same data; images/s over the steps after the warm-up."""
    if s.steps % s.warmup:
        raise ValueError("--steps must be a multiple of --warmup (one metrics line per window)")
    cfg = TrainConfig(
        dataset="prepared",
        data_dir=str(data_dir),
        image_size=s.image_size,
        batch_size=s.batch_size,
        max_steps=s.warmup + s.steps,
        backbone_opts=dict(s.unet),
        log_every=s.warmup,
        save_every=None,
        sample_every=None,
        num_samples=1,
        sample_steps=1,
        output=str(out),
        device=s.device,
        precision=s.precision,
        compile=s.compile,
        channels_last=s.channels_last,
        num_workers=s.num_workers,
    )
    train(cfg, progress=False)
    return trainer_speed(out, s.warmup, s.batch_size)


def trainer_speed(run: Path, window: int, batch_size: int) -> float:
    """Images/s of a run logged every `window` steps, over the lines after the first window
    (compilation, autotuning): each covers exactly `window` steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > window]
    seconds = sum(window * batch_size / r["images_per_s"] for r in timed)
    return len(timed) * window * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    settings = Settings(
        args.steps,
        args.warmup,
        args.batch_size,
        args.image_size,
        dict(UNET),
        args.device,
        args.precision,
        args.compile,
        args.num_workers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_prepared(tmp, args.image_size)
        # Alternate the two, back to back: on a shared machine the speed drifts by more than
        # the difference measured, so each pair's ratio is taken and the median reported.
        bare, ours, ratios = [], [], []
        for r in range(args.repeats):
            bare.append(bare_loop(data, settings))
            ours.append(fmkit_loop(data, tmp / f"run{r}", settings))
            ratios.append(ours[-1] / bare[-1])
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, {args.device} "
        f"{args.precision}{' compiled' if args.compile else ''}, UNet {UNET}, batch "
        f"{args.batch_size} at {args.image_size}x{args.image_size}, "
        f"steps {args.warmup + 1}..{args.warmup + args.steps}"
    )
    print(f"bare PyTorch loop: {max(bare):.1f} images/s (best of {args.repeats})")
    print(f"fmkit train:       {max(ours):.1f} images/s (best of {args.repeats})")
    print(f"pair ratios:       {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio:             {statistics.median(ratios):.3f} (median of the pairs)")


if __name__ == "__main__":
    main()

"""Training speed per space: `fmkit train` images/s at one resolution in pixels, in
patchify's space-to-depth by 2 and 4 and in the latents of an SD-VAE-shaped AutoencoderKL
(4 channels at 1/8 of the side; random weights: the cost is real, the quality is not), the
same UNet family (levels adapted so every run has the same depth of downsampling from the
images' side), same data, same device; and the autoencoder's one-time encoding cost per image
(image and mirror image, as the encoded cache stores them).

Run: python benchmarks/spaces.py [--image-size 256 --batch-size 4 --steps 10 --warmup 3]
     [--device cuda --precision bf16]

A patchified model sees (3 f^2, S/f, S/f): with the same channel widths it does its
convolutions at 1/f^2 of the positions. Its UNet gets `log2 f` fewer levels, so the coarsest
grid is the same size in every run (what a user would build), and attention sits at the same
grid size. Images/s is read from metrics.jsonl over the steps after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fmkit.config import TrainConfig
from fmkit.plugins import registry
from fmkit.space import build_space
from fmkit.train import train

from train_step import synthetic_prepared

# (space, factor): the UNet's levels; each run downsamples the image side by 32 in all.
RUNS = {
    "pixels": ({}, (1, 1, 2, 2, 4, 4)),
    "patchify:2": ({"factor": 2}, (1, 2, 2, 4, 4)),
    "patchify:4": ({"factor": 4}, (2, 2, 4, 4)),
    "autoencoder": ({}, (2, 4, 4)),  # options filled in with the saved SD-VAE-shaped model
}

# stabilityai/sd-vae-ft-ema's architecture (83.7M parameters), built with random weights.
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}


def sd_vae(folder: Path) -> Path:
    """An SD-VAE-shaped AutoencoderKL with random weights, saved in `folder`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(folder)
    return folder


def encoding_cost(space_opts: dict, args) -> float:
    """Seconds per image of the one-time encoding (the image and its mirror image)."""
    space = build_space("autoencoder", space_opts)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1
    space.encode(torch.cat([images, images.flip(-1)]).to(args.device))  # warm-up
    start = time.perf_counter()
    space.encode(torch.cat([images, images.flip(-1)]).to(args.device))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.batch_size


def measure(name: str, data: Path, out: Path, args, vae: Path | None = None) -> dict:
    space_opts, mult = RUNS[name]
    if name == "autoencoder":
        space_opts = {"model": str(vae)}
    space = name.split(":")[0]
    unet = {"base_channels": args.base, "channel_mult": mult, "attn_resolutions": (16,)}
    channels, size = build_space(space, space_opts).shape(3, args.image_size)
    model = registry("backbones").build("unet", unet, image_size=size, channels=channels)
    parameters = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        dataset="prepared", data_dir=str(data), image_size=args.image_size,
        batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        backbone_opts=unet, space=space, space_opts=space_opts, log_every=args.warmup,
        save_every=None, sample_every=None, num_samples=1, sample_steps=1, output=str(out),
        device=args.device, precision=args.precision, logger="none",
    )  # fmt: skip
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    seconds = sum(args.warmup * args.batch_size / r["images_per_s"] for r in timed)
    speed = len(timed) * args.warmup * args.batch_size / seconds
    result = {"run": name, "model": f"{channels}x{size}x{size}", "parameters": parameters,
              "images_per_s": speed}  # fmt: skip
    if name == "autoencoder":
        result["encode_s"] = encoding_cost(space_opts, args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=9, help="timed steps (a multiple of warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base", type=int, default=64, help="the UNet's first width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FMKIT_CACHE"] = str(root / "cache")  # the encoded cache starts empty
        data = synthetic_prepared(
            root, args.image_size, count=args.batch_size * (args.warmup + args.steps)
        )
        names = args.runs.split(",")
        vae = sd_vae(root / "sd-vae") if "autoencoder" in names else None
        results = [measure(n, data, root / n.replace(":", "-"), args, vae) for n in names]
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, {args.device} "
        f"{args.precision}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"UNet base {args.base}"
    )
    print("| space | model input | parameters | images/s | vs pixels |")
    print("| --- | --- | --- | --- | --- |")
    base = results[0]["images_per_s"]
    for r in results:
        print(
            f"| {r['run']} | {r['model']} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x |"
        )
    for r in results:
        if "encode_s" in r:
            print(f"\nencoding once (image + mirror image): {r['encode_s']:.3f} s per image")


if __name__ == "__main__":
    main()

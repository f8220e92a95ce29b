"""The demo's time to its first batch of faces.

    python benchmarks/demo.py                 # 35.7M UNet at 64x64, 8 images, Euler 20
    python benchmarks/demo.py --device cuda

A model folder of the 35.7M UNet (base 128, channel_mult 1,2,2,2, attention at 16x16; DDPM's
CIFAR-10 widths) at 64x64 is written with untrained weights (the time does not depend on
them), `fmkit demo` is started in a fresh process, and the page's request for 8 images with 20
Euler steps is sent as soon as the server answers. Reported: seconds from launching the
process to the first images (start-up, model load and generation), the generation alone as
the server measured it, and a second, warm request.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fmkit import DataSpec, Generator
from fmkit.generator import ModelSpec, build_backbone

OPTS = {"base_channels": 128, "channel_mult": (1, 2, 2, 2), "attn_resolutions": (16,)}
REQUEST = {"seed": 0, "count": 8, "solver": "euler", "steps": 20}


def measure(device: str = "cpu", image_size: int = 64, opts: dict | None = None) -> dict:
    """Start `fmkit demo` on a fresh model folder and time its first and a second request.

    Returns seconds from launch to the first images ("cold"), the first generation as the
    server timed it ("first"), a second request ("warm"), its NFE and the parameter count."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec("unet", dict(opts or OPTS), DataSpec(3, image_size))
        module = build_backbone(spec)
        params = sum(p.numel() for p in module.parameters())
        Generator(spec, module).save_pretrained(Path(tmp) / "model")
        command = [sys.executable, "-m", "fmkit", "demo", "--checkpoint", str(Path(tmp) / "model")]
        command += ["--port", "0", "--device", device]
        start = time.perf_counter()
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            match = re.search(r"http://[\d.]+:\d+/", line)
            if not match:
                raise RuntimeError(f"the demo did not start: {line}{server.stderr.read()}")
            url = match.group(0)
            first = post(url)
            cold = time.perf_counter() - start
            warm_start = time.perf_counter()
            second = post(url)
            warm = time.perf_counter() - warm_start
        finally:
            server.terminate()
            server.wait()
    return {
        "cold_s": cold,
        "first_s": first["seconds"],
        "warm_s": warm,
        "nfe": second["nfe"],
        "params": params,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    r = measure(args.device, args.image_size)
    print(f"\n## Demo: first batch ({r['params'] / 1e6:.1f}M UNet, {args.image_size}x"
          f"{args.image_size}, {REQUEST['count']} images, Euler {REQUEST['steps']}, "
          f"{args.device})\n")  # fmt: skip
    print("| launch to first images (s) | first generation (s) | warm request (s) | NFE |")
    print("| --- | --- | --- | --- |")
    print(f"| {r['cold_s']:.1f} | {r['first_s']:.1f} | {r['warm_s']:.1f} | {r['nfe']} |")


def post(url: str) -> dict:
    """A generation as the demo's page asks for one: JSON, from the page's own origin."""
    request = urllib.request.Request(
        url + "api/generate",
        json.dumps(REQUEST).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Origin": url.rstrip("/")},
    )
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    main()

"""NFE and speed of every registered solver on one checkpoint, in one run.

    python benchmarks/sampling.py --checkpoint results [--num-samples 64] [--batch-size 64]

Without --checkpoint, trains a small UNet on scikit-learn's digits first (as quality.py does)
so adaptive solvers see a real learned field. Prints a Markdown table: solver, settings, NFE per
batch, wall seconds, images/s and the mean absolute difference to a tight dopri5 reference.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from fmkit.config import TrainConfig
from fmkit.generator import Generator
from fmkit.plugins import registry
from fmkit.solver import build_solver
from fmkit.train import train

import quality  # a sibling script: benchmarks/ is on sys.path when run

FIXED_STEPS = {"euler": 50, "midpoint": 25, "heun": 25, "rk4": 12}  # ~50 NFE each


def digits_checkpoint(work: Path, steps: int) -> Path:
    images, _ = quality.digits()
    quality.write_training_set(images[:900], work / "data")
    cfg = TrainConfig(
        **{
            **quality.BASE,
            "data_dir": str(work / "data"),
            "output": str(work / "run"),
            "max_steps": steps,
        }
    )
    return train(cfg, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--train-steps", type=int, default=300, help="without --checkpoint")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or digits_checkpoint(Path(tmp), args.train_steps)
        model = Generator.load(ckpt)
        spec = model.spec
        shape = (spec.data.channels, spec.data.image_size, spec.data.image_size)
        noise = torch.randn(args.num_samples, *shape, generator=torch.Generator().manual_seed(0))
        tight = build_solver("dopri5", options={"rtol": 1e-6, "atol": 1e-6})
        exact = model.generate(noise, tight).x
        print(
            f"# {platform.machine()}, {torch.get_num_threads()} threads, {spec.backbone} "
            f"{spec.backbone_opts} at {spec.data.image_size}x{spec.data.image_size}, "
            f"{args.num_samples} samples"
        )
        print("| solver | settings | NFE | seconds | images/s | mean abs diff to dopri5 (1e-6) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in registry("solvers").names():
            solver = build_solver(name, steps=FIXED_STEPS.get(name))
            settings = f"rtol=atol={solver.rtol:g}" if solver.adaptive else f"steps={solver.steps}"
            start = time.perf_counter()
            nfe, outs = 0, []
            for chunk in noise.split(args.batch_size):
                solution = model.generate(chunk, solver)
                nfe = max(nfe, solution.nfe)
                outs.append(solution.x)
            seconds = time.perf_counter() - start
            diff = (torch.cat(outs) - exact).abs().mean().item()
            print(
                f"| {name} | {settings} | {nfe} | {seconds:.2f} | {args.num_samples / seconds:.1f} | {diff:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

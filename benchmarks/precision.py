"""Does bf16 sampling change the samples? The same noise through the same model with the
network in fp32 and in bf16 autocast (the solver's state fp32 in both, as `fmkit sample
--precision` runs it), scored as quality.py scores: the Fréchet distance in a digits
classifier's features, with the pixel difference between the two precisions beside it.

    python benchmarks/precision.py --checkpoint RUN    # a model trained by quality.py's recipe
    python benchmarks/precision.py                     # trains the default recipe first

On the CPU bf16 autocast exists but is not faster: the figure here is the quality; the speed
is gpu.py's (its sample stages run both precisions).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fmkit.config import TrainConfig
from fmkit.generator import Generator
from fmkit.solver import solver_from_spec
from fmkit.train import train

import quality  # a sibling script: benchmarks/ is on sys.path when run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a digits model (quality.py's data)")
    parser.add_argument("--train-steps", type=int, default=1200, help="without --checkpoint")
    parser.add_argument("--solvers", default="euler:20,ab2:20,ab2:4,dopri5")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            images, labels = quality.digits()
            quality.write_training_set(quality.split(images, labels)[0][0], Path(tmp) / "data")
            cfg = {**quality.BASE, "data_dir": f"{tmp}/data", "output": f"{tmp}/run"}
            checkpoint = train(TrainConfig(**cfg, max_steps=args.train_steps), progress=False)
        scorer = quality.Scorer(args.samples, args.classifier_epochs)
        rows = []
        for spec in args.solvers.split(","):
            out = {}
            for precision in ("fp32", "bf16"):
                model = Generator.load(checkpoint).accelerate(precision)
                start = time.perf_counter()
                solution = model.generate(scorer.noise, solver_from_spec(spec))
                seconds = time.perf_counter() - start
                fd = scorer.distance(solution.x)
                out[precision] = {"x": solution.x, "fd": fd, "nfe": solution.nfe, "s": seconds}
            gap = (out["bf16"]["x"] - out["fp32"]["x"]).abs()
            rows.append({
                "solver": spec,
                **{f"{p}_{k}": out[p][k] for p in out for k in ("fd", "nfe", "s")},
                "mean_abs_diff": gap.mean().item(),  # images in [-1, 1]
                "max_abs_diff": gap.max().item(),
            })  # fmt: skip
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, {scorer.n} samples of "
          f"{checkpoint}; real-vs-real floor {scorer.floor:.1f}")  # fmt: skip
    print("| solver | NFE | fp32 distance | bf16 distance | change | mean / max abs pixel diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        change = 100 * (r["bf16_fd"] / r["fp32_fd"] - 1)
        print(
            f"| {r['solver']} | {r['fp32_nfe']}/{r['bf16_nfe']} | {r['fp32_fd']:.1f} | "
            f"{r['bf16_fd']:.1f} | {change:+.1f}% | {r['mean_abs_diff']:.4f} / "
            f"{r['max_abs_diff']:.3f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"floor": scorer.floor, "samples": scorer.n, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()

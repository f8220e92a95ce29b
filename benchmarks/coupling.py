"""Minibatch optimal-transport coupling against independent noise.

    python benchmarks/coupling.py --part quality --steps 800   # digits, equal steps
    python benchmarks/coupling.py --part quality --batch 128 --couplings independent,ot
    python benchmarks/coupling.py --part time                  # the assignment's cost

quality  the quality benchmark's digits and UNet trained with --coupling independent, ot and
         sinkhorn for the same steps (one process: global and local scopes coincide there;
         tests/test_distributed.py checks that two processes pair like one; --torchrun N adds
         ot with scope local on N processes, each coupling its 1/N): dopri5's NFE, the
         straightness of sampled paths (mean squared deviation of a 20-step Euler trajectory
         from the straight line between its ends, per pixel), and the Fréchet distance at
         Euler 4, 8 and 20 on the uniform grid and with fmkit's default sampler (ab2, 20
         steps on the shift grid).
time     seconds (CPU, this machine) for the squared-distance matrix and for solving the exact
         and the entropic coupling at global batch 128, 512 and 2,048 of 64x64 RGB images,
         beside the training step of the 35.7M UNet on an H200 at the same batch
         (docs/benchmarks.md, GPU section: 1,495 img/s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmkit import Generator
from fmkit.config import TrainConfig
from fmkit.solver import solver_from_spec
from fmkit.train import train
from fmkit_plugins.coupling import assignment, sinkhorn_draw

import quality  # a sibling script: benchmarks/ is on sys.path when run

COUPLINGS = ("independent", "ot", "sinkhorn")
H200_IMAGES_PER_S = 1495.0  # compiled bf16 step of the 35.7M UNet, docs/benchmarks.md


def run(args: tuple[Path, str, int, int]) -> Path:
    work, coupling, steps, batch = args
    out = work / f"{coupling}-b{batch}"
    final = out / "checkpoint_final.safetensors"
    if not final.is_file():
        torch.set_num_threads(1)
        cfg = {**quality.BASE, "data_dir": str(work / "data"), "output": str(out)}
        cfg["batch_size"] = batch
        train(TrainConfig(**cfg, max_steps=steps, coupling=coupling), progress=False)
    return final


def run_torchrun_local(work: Path, steps: int, batch: int, procs: int) -> Path:
    """Exact OT within each process's micro-batch (scope local) under torchrun: the per-GPU
    coupling other toolkits use. The global scope needs no run of its own: it pairs exactly
    like one process (tests/test_distributed.py), so the one-process `ot` row is it."""
    import os
    import subprocess

    out = work / f"ot-local{procs}-b{batch}"
    final = out / "checkpoint_final.safetensors"
    if final.is_file():
        return final
    base = quality.BASE
    flags = ["--dataset", "prepared", "--data-dir", work / "data", "--output", out]
    flags += ["--image-size", base["image_size"], "--batch-size", batch, "--max-steps", steps]
    flags += ["--save-every", 0, "--sample-every", 0, "--num-samples", base["num_samples"]]
    flags += ["--sample-steps", base["sample_steps"], "--log-every", base["log_every"]]
    flags += ["--device", "cpu", "--no-hflip", "--coupling", "ot"]
    flags += ["--objective-opt", "coupling_scope=local"]
    for key, value in base["backbone_opts"].items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else value
        flags += ["--backbone-opt", f"{key}={text}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += [f"--nproc-per-node={procs}", "-m", "fmkit", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launcher, *map(str, flags)], check=True, env=env)
    return final


def part_quality(
    work: Path,
    steps: int,
    batch: int,
    couplings: list[str],
    parallel: int,
    samples: int,
    epochs: int,
    torchrun: int = 0,
) -> None:
    if not (work / "data" / "meta.json").is_file():
        images, labels = quality.digits()
        quality.write_training_set(quality.split(images, labels)[0][0], work / "data")
    jobs = [(work, c, steps, batch) for c in couplings]
    if parallel > 1:
        with multiprocessing.get_context("spawn").Pool(parallel) as pool:
            finals = pool.map(run, jobs)
    else:
        finals = [run(job) for job in jobs]
    names = list(couplings)
    if torchrun > 1:
        finals.append(run_torchrun_local(work, steps, batch, torchrun))
        names.append(f"ot (local, {torchrun} processes)")
    scorer = quality.Scorer(samples, epochs)
    noise, floor = scorer.noise, scorer.floor
    print(
        f"\n## Coupling at {steps} steps, batch {batch} "
        f"(digits, EMA, {samples} samples, floor {floor:.1f})\n"
    )
    print("| coupling | dopri5 NFE | dopri5 | straightness | Euler 4 | Euler 8 | Euler 20 "
          "| ab2 20, shift (the default) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for coupling, final in zip(names, finals, strict=True):
        model = Generator.load(final)
        cells = []
        dopri = model.generate(noise, solver_from_spec("dopri5"))
        cells += [str(dopri.nfe), f"{scorer.distance(dopri.x):.1f}"]
        path = model.generate(
            noise, solver_from_spec("euler:20:schedule=uniform"), times=torch.linspace(0, 1, 21)
        ).trajectory  # (21, N, C, H, W)
        s = torch.linspace(0, 1, 21).view(-1, 1, 1, 1, 1)
        line = (1 - s) * path[0] + s * path[-1]
        cells.append(f"{((path - line) ** 2).mean().item():.4f}")
        for n in (4, 8, 20):
            x = model.generate(noise, solver_from_spec(f"euler:{n}:schedule=uniform")).x
            cells.append(f"{scorer.distance(x):.1f}")
        x = model.generate(noise, solver_from_spec("ab2:20")).x  # what `fmkit sample` does
        cells.append(f"{scorer.distance(x):.1f}")
        print(f"| {coupling} | " + " | ".join(cells) + " |", flush=True)


def part_time() -> None:
    """The coupling's two parts timed apart: the squared-distance rows are computed where the
    images are (the GPU in a GPU run); the assignment itself always runs on the CPU."""
    step_s = 512 / H200_IMAGES_PER_S
    print("\n## Assignment time (CPU, 64x64 RGB; one process)\n")
    print("| global batch | cost matrix (s) | ot solve (s) | sinkhorn solve (s) "
          "| ot solve / H200 step | cost + ot / H200 step |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    assignment(torch.rand(8, 8, dtype=torch.float64))  # imports scipy: not the solve's time
    for batch in (128, 512, 2048):
        g = torch.Generator().manual_seed(0)
        x1, noise = (torch.randn(batch, 3 * 64 * 64, generator=g) for _ in range(2))
        start = time.perf_counter()
        cost = torch.cdist(x1.double(), noise.double()) ** 2  # as couple() computes it
        cost_s = time.perf_counter() - start
        start = time.perf_counter()
        assignment(cost)
        ot_s = time.perf_counter() - start
        start = time.perf_counter()
        sinkhorn_draw(cost, 0.05, torch.Generator().manual_seed(0))
        sinkhorn_s = time.perf_counter() - start
        step = step_s * batch / 512
        print(f"| {batch} | {cost_s:.3f} | {ot_s:.3f} | {sinkhorn_s:.3f} | {ot_s / step:.3f} "
              f"| {(cost_s + ot_s) / step:.2f} |", flush=True)  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="quality,time")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64, help="training batch = OT group")
    parser.add_argument("--couplings", default=",".join(COUPLINGS))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument(
        "--torchrun", type=int, default=0, help="also train ot with scope local on N processes"
    )
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the runs here")
    args = parser.parse_args(argv)
    parts = args.part.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "quality" in parts:
            part_quality(
                work,
                args.steps,
                args.batch,
                args.couplings.split(","),
                args.parallel,
                args.samples,
                args.classifier_epochs,
                args.torchrun,
            )
        if "time" in parts:
            part_time()


if __name__ == "__main__":
    main()

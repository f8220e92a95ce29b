"""Every GPU path of fmkit in one run, with the figures that say whether it is fast.

    bash benchmarks/gpu.sh            # on a GPU machine: <= 8 minutes on one H100
    python benchmarks/gpu.py --smoke  # the same stages, tiny, on the CPU (CI runs this)

Stages (each one's failure is reported and makes the run exit 1; the others still run):
  train    the 35.7M UNet (DDPM's CIFAR-10 configuration) at 64x64, batch 128, on a prepared
           synthetic array, through `fmkit train`: fp32 (TF32), bf16, and the defaults (bf16 and
           torch.compile on CUDA; channels_last and fused AdamW on CUDA throughout); images/s
           after warm-up, peak memory, and MFU from FLOPs counted by torch.utils.flop_counter
           on the real training step against the card's dense bf16 peak; plus a bare loop in
           the last setting.
  main     the README's own command on the prepared array: the default model (9.0M UNet) and
           batch (32) with every speed flag at its default, then --no-compile and
           --no-channels-last, and the bare loop on that model in torch.compile's modes
           (CUDA graphs) and layouts: how far the default is from the best found.
  sample   1,000 images with Euler 20 (default precision: bf16 on CUDA; fp32; compiled) and
           dopri5 from the trained checkpoint (`fmkit sample`), and the bf16-fp32 difference.
  torchrun `torchrun --nproc-per-node 1` (NCCL on a GPU) for a few steps, then a resume, and
           the weight difference to an uninterrupted run.
  fid      `fmkit eval fid` on the device with a random-weights Inception file.
  demo     `fmkit demo` on the device: launch to the first 8 images of the 35.7M UNet (Euler
           20), and a warm request (benchmarks/demo.py).
  coupling exact OT coupling (--coupling ot) with the batch on the device at global batch 128,
           512 and 2,048, against the training step at that batch (needs scipy).

Prints one Markdown table; `--json FILE` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from fmkit.plugins import registry

import demo  # sibling scripts: benchmarks/ is on sys.path when this one runs
import train_step

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}

FULL = {
    "image_size": 64,
    "batch_size": 128,
    "unet": {"base_channels": 128},  # 35,746,307 parameters: DDPM's CIFAR-10 UNet
    "warmup": 15,  # steps before timing (compilation, autotuning); also the metrics window
    "steps": 45,  # timed steps
    "images": 2048,  # synthetic training images
    "samples": 1000,
    "sample_batch": 500,
    "small_unet": ["base_channels=32", "channel_mult=1,2,2", "attn_resolutions=16"],
    # (label, precision, torch.compile; None: fmkit's default); the bare loop runs the last.
    "modes": [("fp32", "fp32", False), ("bf16", "bf16", False), ("defaults", "auto", None)],
    # The README's command: its default model (9.0M UNet) and batch (32), flags as given.
    "main_warmup": 20,
    "main_steps": 100,
    "main_batch": 32,  # fmkit train's default
    "main_variants": [
        ("defaults", []),
        ("--no-compile", ["--no-compile"]),
        ("--no-channels-last", ["--no-channels-last"]),
    ],
    # The same model and batch in the bare loop: torch.compile modes and layouts.
    "main_bare": [
        ("compile", {}),
        ("compile, CUDA graphs", {"mode": "reduce-overhead"}),
        ("compile, contiguous", {"channels_last": False}),
    ],
    "coupling_batches": (128, 512, 2048),
}
SMOKE = {
    "image_size": 16,
    "batch_size": 8,
    "unet": {
        "base_channels": 8,
        "channel_mult": (1, 2),
        "attn_resolutions": (8,),
        "num_res_blocks": 1,
    },
    "warmup": 2,
    "steps": 2,
    "images": 32,
    "samples": 16,
    "sample_batch": 8,
    "small_unet": [
        "base_channels=8",
        "channel_mult=1,2",
        "attn_resolutions=8",
        "num_res_blocks=1",
    ],
    # Compiling on 2 CPU cores takes longer than the rest together; the test suite has its own
    # compiled training-and-resume test.
    "modes": [("fp32", "fp32", False), ("bf16", "bf16", False)],
    "main_warmup": 1,
    "main_steps": 1,
    "main_batch": 4,  # the default model, at a batch the CPU takes in seconds
    "main_variants": [("defaults", ["--batch-size", 4, "--num-samples", 1, "--sample-steps", 1])],
    "main_bare": [("eager", {"compile": False})],
    "coupling_batches": (16,),
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def step_flops(cfg: dict, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward of the backbone on the flow-matching
    loss), counted by torch.utils.flop_counter on the real model and batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from fmkit.flow import FlowMatching

    model = registry("backbones").build(
        "unet", cfg["unet"], image_size=cfg["image_size"], channels=3
    )
    flow = FlowMatching(model.to(device), "linear")
    x1 = torch.rand(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"], device=device)
    with FlopCounterMode(display=False) as counter:
        flow.loss(x1 * 2 - 1).backward()
    return counter.get_total_flops()


def run(cmd: list[str], timeout: float = 600) -> str:
    """Run a command; its combined output, or an exception holding the output's tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{output[-3000:]}")
    return output


def fmkit_cli(*args) -> list[str]:
    return [sys.executable, "-m", "fmkit", *map(str, args)]


def stage_train(cfg, work, device, peak, results, rows) -> Path:
    data = train_step.synthetic_prepared(work / "data", cfg["image_size"], cfg["images"])
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    flops = step_flops(cfg, device)
    results["flops_per_step"] = flops
    last = None
    for label, precision, compiled in cfg["modes"]:
        settings = train_step.Settings(
            cfg["steps"], cfg["warmup"], cfg["batch_size"], cfg["image_size"], cfg["unet"],
            device.type, precision, compiled, workers,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = work / f"train-{label}"
        ips = train_step.fmkit_loop(data, out, settings)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        mfu = flops * ips / cfg["batch_size"] / (peak * 1e12) if peak else None
        results[f"train_{label}"] = {"images_per_s": ips, "peak_gib": peak_mem, "mfu": mfu}
        rows.append(
            (
                f"fmkit train {label}",
                f"{ips:,.0f} img/s, peak {peak_mem:.1f} GiB, MFU "
                + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a"),
            )
        )
        last = out
    bare = train_step.bare_loop(data, settings)
    ratio = results[f"train_{label}"]["images_per_s"] / bare
    results[f"bare_{label}"] = {"images_per_s": bare, "trainer_ratio": ratio}
    rows.append((f"bare loop {label}", f"{bare:,.0f} img/s; trainer/bare {ratio:.3f}"))
    return last


def stage_main(cfg, work, device, data, results, rows) -> None:
    """The README's main job, `fmkit train --backbone unet --dataset celeba`, on a prepared
    array at 64x64 instead of CelebA: the default model and batch, every speed flag at its
    default; then each variant's flags, and the bare loop on the same model and batch in
    torch.compile's modes and layouts. Says how far the default is from the best found."""
    warm, steps, batch = cfg["main_warmup"], cfg["main_steps"], cfg["main_batch"]
    speeds = {}
    for label, extra in cfg["main_variants"]:
        out = work / f"main-{len(speeds)}"
        args = ["train", "--backbone", "unet", "--dataset", "prepared", "--data-dir", data]
        args += ["--image-size", cfg["image_size"], "--max-steps", warm + steps]
        args += ["--log-every", warm, "--device", device.type, "--output", out, *extra]
        output = run(fmkit_cli(*args))
        speeds[f"fmkit train {label}"] = train_step.trainer_speed(out, warm, batch)
        if label == "defaults":
            results["main_startup"] = [
                line for line in output.splitlines() if line.startswith(("model:", "device:"))
            ]
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    for label, changes in cfg["main_bare"]:
        settings = train_step.Settings(
            steps, warm, batch, cfg["image_size"], {}, device.type, "auto", None, workers
        )
        for key, value in changes.items():
            setattr(settings, key, value)
        speeds[f"bare loop, {label}"] = train_step.bare_loop(data, settings)
    best = max(speeds, key=speeds.get)
    default = speeds["fmkit train defaults"]
    ratio = default / speeds[best]
    results["main"] = {"images_per_s": speeds, "best": best, "default_vs_best": ratio}
    for label, ips in speeds.items():
        rows.append((f"main job: {label}", f"{ips:,.0f} img/s ({ips / speeds[best]:.2f} of best)"))


def stage_sample(cfg, work, device, run_dir, results, rows) -> None:
    """`fmkit sample` from the trained checkpoint: Euler 20 at the default precision (bf16 on
    CUDA), forced to fp32, and compiled; dopri5 at the defaults. Then how far bf16 moves the
    samples from fp32 (the same noise, Euler 20)."""
    variants = (
        ("euler", "euler", ["--steps", 20]),
        ("euler_fp32", "euler", ["--steps", 20, "--precision", "fp32"]),
        ("euler_compiled", "euler", ["--steps", 20, "--compile"]),
        ("dopri5", "dopri5", []),
    )
    for label, solver, extra in variants:
        if label == "euler_compiled" and device.type != "cuda":
            continue  # a CPU compile is the test suite's, not this smoke run's
        output = run(
            fmkit_cli(
                "sample",
                "--checkpoint",
                run_dir,
                "--solver",
                solver,
                *extra,
                "--num-samples",
                cfg["samples"],
                "--batch-size",
                cfg["sample_batch"],
                "--device",
                device.type,
                "--output",
                work / f"samples-{label}",
            )  # fmt: skip
        )
        nfe = [int(n) for n in re.findall(r"batch \d+/\d+: \d+ images, NFE (\d+)", output)]
        ips = float(re.search(r"([\d.]+) images/s", output).group(1))
        precision = re.search(r"mean NFE [\d.]+, (\w+)\)", output).group(1)
        results[f"sample_{label}"] = {"images_per_s": ips, "nfe": nfe, "precision": precision}
        rows.append((f"sample {label} ({precision})", f"{ips:,.1f} img/s, NFE per batch {nfe}"))

    from fmkit import Generator
    from fmkit.solver import solver_from_spec

    model = Generator.load(run_dir, device=device)
    noise = torch.randn(64, 3, cfg["image_size"], cfg["image_size"])
    fp32 = model.accelerate("fp32").generate(noise, solver_from_spec("euler:20")).x
    bf16 = model.accelerate("bf16").generate(noise, solver_from_spec("euler:20")).x
    gap = (bf16 - fp32).abs()
    results["sample_bf16_vs_fp32"] = {"mean_abs": gap.mean().item(), "max_abs": gap.max().item()}
    rows.append(
        (
            "bf16 vs fp32 samples (64, Euler 20, in [-1, 1])",
            f"mean |diff| {gap.mean().item():.2e}, max {gap.max().item():.2e}",
        )
    )


def stage_torchrun(cfg, work, device, data, results, rows) -> None:
    from fmkit import checkpoint

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

    def fmkit_torchrun(out: Path, steps: int, *extra) -> str:
        args = ["train", "--dataset", "prepared", "--data-dir", data]
        args += ["--image-size", cfg["image_size"], "--batch-size", 16, "--max-steps", steps]
        args += ["--save-every-steps", 3, "--num-samples", 4, "--sample-steps", 2]
        # A constant rate: the split run stops at 3 and resumes to 6, where a decay would end
        # at another step than the uninterrupted run's.
        args += ["--lr-schedule", "constant", "--device", device.type, "--output", out, *extra]
        for opt in cfg["small_unet"]:
            args += ["--backbone-opt", opt]
        return run([*launcher, "--nproc-per-node", "1", "-m", "fmkit", *map(str, args)])

    fmkit_torchrun(work / "tr-full", 6)
    fmkit_torchrun(work / "tr-split", 3)
    resumed = fmkit_torchrun(work / "tr-split", 6, "--resume")
    if "resumed from" not in resumed:
        raise RuntimeError(f"the torchrun resume did not resume:\n{resumed[-2000:]}")
    full, meta = checkpoint.load(work / "tr-full" / "checkpoint_final.safetensors")
    split, _ = checkpoint.load(work / "tr-split" / "checkpoint_final.safetensors")
    keys = [k for k in full if k.startswith("model.")]
    diff = max((full[k].float() - split[k].float()).abs().max().item() for k in keys)
    backend = "nccl" if device.type == "cuda" else "gloo"
    results["torchrun"] = {
        "backend": backend,
        "resume_max_abs_diff": diff,
        "meta_world": meta["world_size"],
    }
    exact = "bit-exact" if diff == 0 else f"max |diff| {diff:.2e} after resume"
    rows.append((f"torchrun 1 proc ({backend}) + resume", f"ok; vs uninterrupted: {exact}"))


def random_inception(path: Path) -> Path:
    """A randomly initialised Inception-v3 in torch-fidelity's weights format (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # Building the network normally loads the official weights; skip that once.
    load_url, load_sd = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *args, **kwargs: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = load_url
        fe.FeatureExtractorInceptionV3.load_state_dict = load_sd
    torch.save(net.state_dict(), path)
    return path


def stage_fid(cfg, work, device, run_dir, data, results, rows) -> None:
    weights = random_inception(work / "inception.pth")
    start = time.perf_counter()
    output = run(
        fmkit_cli(
            "eval",
            "fid",
            "--checkpoint",
            run_dir,
            "--data-dir",
            data,
            "--num-samples",
            cfg["samples"],
            "--batch-size",
            cfg["sample_batch"],
            "--solver",
            "euler",
            "--steps",
            20,
            "--max-reference-images",
            cfg["samples"],
            "--inception-weights",
            weights,
            "--cache-dir",
            work / "fid-cache",
            "--device",
            device.type,
        )
    )
    seconds = time.perf_counter() - start
    fid = float(re.search(r"FID ([\d.eE+-]+)", output).group(1))
    results["fid"] = {"fid_random_inception": fid, "wall_s": seconds}
    rows.append(("eval fid (random Inception)", f"FID {fid:.4g}; {seconds:.0f} s end to end"))


def stage_demo(cfg, device, results, rows) -> None:
    """`fmkit demo` on this device: launch to the first 8 images (Euler 20), as benchmarks/demo.py."""
    r = demo.measure(device.type, cfg["image_size"], cfg["unet"])
    results["demo"] = r
    rows.append(
        (
            "fmkit demo, 8 images, Euler 20",
            f"launch to first images {r['cold_s']:.1f} s (generation {r['first_s']:.2f} s), "
            f"warm request {r['warm_s']:.2f} s, NFE {r['nfe']}",
        )
    )


def stage_coupling(cfg, device, results, rows) -> None:
    """The exact OT coupling with images and noise on this device (distances computed here,
    the assignment solved on the CPU), against this run's training step at that batch."""
    from fmkit_plugins.coupling import couple

    size = cfg["image_size"]
    ips = max(
        (v["images_per_s"] for k, v in results.items() if k.startswith("train_")), default=None
    )
    for batch in cfg["coupling_batches"]:
        x1, noise = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
        couple(noise[:8], x1[:8], 0, None, "ot", False)  # warm: imports, kernels
        _, seconds = couple(noise, x1, 0, None, "ot", False)  # ends with a copy to the CPU
        share = seconds / (batch / ips) if ips else None
        results[f"coupling_ot_{batch}"] = {"seconds": seconds, "step_share": share}
        text = f"{seconds:.3f} s" + (f" = {100 * share:.1f}% of a training step" if share else "")
        rows.append((f"ot coupling, global batch {batch}", text))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak [default: by name]")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--stages",
        default="train,main,sample,fid,torchrun,demo,coupling",
        help="comma-separated subset (sample and fid need train)",
    )
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    device_name = "cpu" if args.smoke and args.device == "auto" else args.device
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name
    )
    peak = peak_tflops(device, args.peak_tflops)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {
        "device": card,
        "torch": torch.__version__,
        "peak_bf16_tflops": peak,
        "settings": {k: v for k, v in cfg.items() if k != "small_unet"},
    }
    rows: list[tuple[str, str]] = []
    failed: list[str] = []
    began = time.perf_counter()

    def stage(name: str, body: Callable[[], object]):
        start = time.perf_counter()
        try:
            value = body()
        except Exception:
            failed.append(name)
            rows.append((name, "FAILED (traceback above)"))
            print(f"\n=== stage {name} FAILED ===", file=sys.stderr)
            traceback.print_exc()
            return None
        print(f"stage {name}: {time.perf_counter() - start:.0f} s", flush=True)
        return value

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wanted = set(args.stages.split(","))
        if wanted & {"train", "sample", "fid"}:
            run_dir = stage("train", lambda: stage_train(cfg, work, device, peak, results, rows))
        else:
            run_dir = None
            train_step.synthetic_prepared(work / "data", cfg["image_size"], cfg["images"])
        data = work / "data" / "prepared"
        for name, body in (
            ("sample", lambda: stage_sample(cfg, work, device, run_dir, results, rows)),
            ("fid", lambda: stage_fid(cfg, work, device, run_dir, data, results, rows)),
        ):
            if name not in wanted:
                continue
            if run_dir is None:
                failed.append(name)
                rows.append((name, "not run: training failed"))
            else:
                stage(name, body)
        if "main" in wanted:
            stage("main", lambda: stage_main(cfg, work, device, data, results, rows))
        if "torchrun" in wanted:
            stage("torchrun", lambda: stage_torchrun(cfg, work, device, data, results, rows))
        if "demo" in wanted:
            stage("demo", lambda: stage_demo(cfg, device, results, rows))
        if "coupling" in wanted:
            stage("coupling", lambda: stage_coupling(cfg, device, results, rows))
    results["wall_s"] = time.perf_counter() - began
    results["failed"] = failed

    print(f"\n# {card}, torch {torch.__version__}, dense bf16 peak {peak} TFLOP/s")
    print(
        f"# UNet {cfg['unet']} at {cfg['image_size']}x{cfg['image_size']}, batch "
        f"{cfg['batch_size']}, {cfg['steps']} steps timed after {cfg['warmup']}; "
        f"{results.get('flops_per_step', 0) / 1e12:.3f} TFLOP per training step"
    )
    print("| stage | result |\n| --- | --- |")
    for name, text in rows:
        print(f"| {name} | {text} |")
    print(f"total {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"FAILED stages: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a GPU run executes, caught on the CPU: bf16 autocast, channels_last, fused AdamW and
torch.compile through training and a resume; and benchmarks/gpu.py's stages in --smoke form, so
the script a GPU session runs cannot rot between sessions."""

import json
import subprocess
import sys

import torch
from conftest import REPO, TINY, run_fmkit, train_args, write_image

from fmkit import Generator, checkpoint
from fmkit.solver import solver_from_spec

# The tiny UNet at one level: a cold compiler cache builds a few kernels, not dozens.
COMPILED = [
    *TINY[:2],
    "--backbone-opt",
    "channel_mult=1",
    "--backbone-opt",
    "attn_resolutions=16",
    *TINY[6:],
]


def test_the_gpu_code_path_trains_and_resumes_on_the_cpu(tmp_path, run_cli):
    faces = tmp_path / "faces"
    for i in range(8):
        write_image(faces / f"{i}.png", size=(16, 16), color=(30 * i, 80, 200 - 20 * i))
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16]
    args += ["--batch-size", 4, "--num-samples", 1, "--sample-steps", 1, "--output", out, *COMPILED]
    gpu = ["--precision", "bf16", "--channels-last", "--fused-adamw", "--compile"]
    gpu += ["--save-every-steps", 2]
    first = run_cli(*args, *gpu, "--max-steps", 2)
    assert first.exit_code == 0, first.output
    resumed = run_cli(*args, *gpu, "--max-steps", 3, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 2" in resumed.output
    for run in (first, resumed):  # compiled, and the warm-up reported once
        assert "compile on" in run.output and run.output.count("note: torch.compile:") == 1
        assert "torch.compile failed" not in run.output
    tensors, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["step"] == 3 and meta["config"]["channels_last"] is True
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())

    # Sampling as `fmkit eval` runs it on a GPU: the network compiled, in bf16.
    sampled = run_cli(
        "sample",
        "--checkpoint",
        out,
        "--num-samples",
        4,
        "--steps",
        3,
        "--precision",
        "bf16",
        "--compile",
        "--output",
        tmp_path / "samples",
    )
    assert sampled.exit_code == 0, sampled.output
    assert "note: torch.compile: the first network evaluation took" in sampled.output
    assert "mean NFE 3.0, bf16)" in sampled.output and "torch.compile failed" not in sampled.output


def test_bf16_sampling_stays_close_to_fp32_and_the_cpu_default_is_fp32(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    assert run_cli(*train_args(faces, out, "--max-steps", 3)).exit_code == 0
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    solver = solver_from_spec("euler:8")
    default = Generator.load(out).generate(noise, solver).x
    fp32 = Generator.load(out).accelerate("fp32").generate(noise, solver).x
    bf16 = Generator.load(out).accelerate("bf16").generate(noise, solver)
    assert torch.equal(default, fp32)  # the CPU's auto is fp32
    assert bf16.x.dtype == torch.float32 and bf16.nfe == 8  # the solver's state stays fp32
    gap = (bf16.x - fp32).abs()
    assert 0 < gap.max() < 0.05 * fp32.abs().max(), gap.max()  # bf16 ran, and changed little


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(tmp_path, faces, run_cli):
    # No C++ compiler for Inductor's CPU kernels and a cold compiler cache: torch.compile fails
    # on the first step, as it does on a machine without a toolchain.
    broken = {
        "CXX": str(tmp_path / "no-such-g++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    }
    args = train_args(faces, tmp_path / "compiled", "--max-steps", 2, "--compile")
    compiled = run_fmkit(*args, env_extra=broken)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    warnings = [line for line in compiled.stdout.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), compiled.stdout
    assert "training without it" in warnings[0] and "Traceback" not in compiled.stderr
    eager = run_cli(*train_args(faces, tmp_path / "eager", "--max-steps", 2, "--no-compile"))
    assert eager.exit_code == 0, eager.output
    # The failed step was taken again with the random numbers it first drew.
    fell_back, _ = checkpoint.load(tmp_path / "compiled" / "checkpoint_final.safetensors")
    plain, _ = checkpoint.load(tmp_path / "eager" / "checkpoint_final.safetensors")
    assert fell_back.keys() == plain.keys()
    assert all(torch.equal(fell_back[k], plain[k]) for k in plain)


def test_compile_defaults_to_on_for_cuda_only(tmp_path, faces, run_cli):
    from fmkit.device import choose

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose(cuda, "auto", None, None, None).compile is True
    assert choose(cpu, "auto", None, None, None).compile is False
    assert choose(cuda, "auto", None, None, False).compile is False
    result = run_cli(*train_args(faces, tmp_path / "run", "--max-steps", 1))
    assert result.exit_code == 0, result.output
    assert "compile off" in result.output


def test_gpu_benchmark_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["failed"] == [] and results["flops_per_step"] > 0
    for stage in ("train_fp32", "train_bf16", "bare_bf16", "sample_euler", "sample_dopri5"):
        assert stage in results, stage
    assert results["sample_euler"]["nfe"] == [20, 20]
    assert results["sample_euler"]["precision"] == results["sample_euler_fp32"]["precision"]
    assert 0 < results["main"]["default_vs_best"] <= 1  # the README's command, timed
    model, device = results["main_startup"]  # the default UNet (at 16x16 here), defaults
    assert model.startswith("model: unet (8.7M parameters)") and "batch 4 " in device
    assert results["torchrun"]["resume_max_abs_diff"] == 0  # gloo on the CPU: bit-exact
    assert results["demo"]["nfe"] == 20 and results["demo"]["cold_s"] > results["demo"]["first_s"]
    assert 0 < results["coupling_ot_16"]["seconds"] < 60
    assert (
        "| fmkit train bf16 |" in proc.stdout
        and "| torchrun 1 proc (gloo) + resume |" in proc.stdout
    )

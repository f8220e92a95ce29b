"""What a GPU run executes, caught on the CPU: bf16 autocast, channels_last, fused AdamW and
torch.compile through training and a resume; and benchmarks/gpu.py's stages in --smoke form, so
the script a GPU session runs cannot rot between sessions."""

import json
import subprocess
import sys

import torch
from conftest import REPO, TINY, write_image

from fmkit import checkpoint


def test_the_gpu_code_path_trains_and_resumes_on_the_cpu(tmp_path, run_cli):
    faces = tmp_path / "faces"
    for i in range(8):
        write_image(faces / f"{i}.png", size=(16, 16), color=(30 * i, 80, 200 - 20 * i))
    out = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16]
    args += ["--batch-size", 4, "--num-samples", 1, "--sample-steps", 1, "--output", out, *TINY]
    gpu = ["--precision", "bf16", "--channels-last", "--fused-adamw", "--compile"]
    gpu += ["--save-every-steps", 2]
    first = run_cli(*args, *gpu, "--max-steps", 2)
    assert first.exit_code == 0, first.output
    resumed = run_cli(*args, *gpu, "--max-steps", 3, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 2" in resumed.output
    tensors, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["step"] == 3 and meta["config"]["channels_last"] is True
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_gpu_benchmark_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["failed"] == [] and results["flops_per_step"] > 0
    for stage in ("train_fp32", "train_bf16", "bare_bf16", "sample_euler", "sample_dopri5"):
        assert stage in results, stage
    assert results["sample_euler"]["nfe"] == [20, 20]
    assert results["torchrun"]["resume_max_abs_diff"] == 0  # gloo on the CPU: bit-exact
    assert results["demo"]["nfe"] == 20 and results["demo"]["cold_s"] > results["demo"]["first_s"]
    assert 0 < results["coupling_ot_16"]["seconds"] < 60
    assert (
        "| fmkit train bf16 |" in proc.stdout
        and "| torchrun 1 proc (gloo) + resume |" in proc.stdout
    )

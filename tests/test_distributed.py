"""torchrun on the CPU with gloo: 2 processes train like 1, resume, read shards, and fail fast."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY as TINY_UNET
from conftest import make_plugin_distribution, write_image

from fmkit import checkpoint

# Dropout draws per-rank randomness: off, so ranks can match a single process.
TINY = [*TINY_UNET, "--backbone-opt", "dropout=0.0"]


def env(extra=None):
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FMKIT_", "RANK", "WORLD_SIZE", "LOCAL_RANK")) or k == "FMKIT_CACHE"
    }
    e["FMKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    e.update(extra or {})
    return e


def fmkit(*args, procs=1, extra_env=None, timeout=240):
    launcher = [sys.executable, "-m", "fmkit"]
    if procs > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "fmkit",
        ]
    return subprocess.run(
        [*launcher, *map(str, args)],
        capture_output=True,
        text=True,
        env=env(extra_env),
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for i in range(32):
        write_image(
            root / f"{i:02d}.png", size=(18, 18), color=(i * 8, 255 - i * 8, (i * 40) % 255)
        )
    return root


def train_args(faces, out, *extra):
    return [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--dataset-opt",
        "flip=false",
        "--image-size",
        16,
        "--batch-size",
        8,
        "--num-samples",
        2,
        "--sample-steps",
        2,
        "--log-every",
        1,
        # Adam turns float-rounding differences of near-zero gradients into steps of about lr:
        # a fixed, small lr keeps the 1-vs-2-process comparison at float tolerance.
        "--lr",
        "1e-4",
        "--lr-schedule",  # resumed runs here get a new --max-steps: no decay to move
        "constant",
        "--output",
        out,
        *TINY,
        *extra,
    ]


def weights(path):
    tensors, meta = checkpoint.load(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "phema."))}, meta


def trained(faces, out, *extra, procs=1):
    """Train (under torchrun when procs > 1) and return the final weights."""
    result = fmkit(*train_args(faces, out, *extra), procs=procs)
    assert result.returncode == 0, result.stderr
    return weights(out / "checkpoint_final.safetensors")[0]


def assert_close(a, b, exact=False):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_two_processes_match_one_and_grad_accum(tmp_path, faces):
    one = fmkit(*train_args(faces, tmp_path / "one", "--max-steps", 5))
    assert one.returncode == 0, one.stderr
    two = fmkit(*train_args(faces, tmp_path / "two", "--max-steps", 5), procs=2)
    assert two.returncode == 0, two.stderr
    accum = fmkit(*train_args(faces, tmp_path / "accum", "--max-steps", 5, "--grad-accum", 2))
    assert accum.returncode == 0, accum.stderr
    # One checkpoint, written once; one metrics line per step.
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == [
        "checkpoint_final.safetensors"
    ]
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 5
    assert two.stdout.count("final checkpoint:") == 1
    ref, _ = weights(tmp_path / "one" / "checkpoint_final.safetensors")
    got, meta = weights(tmp_path / "two" / "checkpoint_final.safetensors")
    assert meta["world_size"] == 2
    assert_close(ref, got)
    assert_close(ref, weights(tmp_path / "accum" / "checkpoint_final.safetensors")[0])
    # Rank 0 alone stored the post-hoc EMA snapshots (5 steps: one a step), equal to one
    # process's.
    snapshots = sorted(p.name for p in (tmp_path / "two" / "phema").iterdir())
    assert snapshots == [f"phema_{n:08d}.safetensors" for n in range(1, 6)]
    last = "phema/phema_00000005.safetensors"
    assert_close(
        checkpoint.load(tmp_path / "one" / last)[0], checkpoint.load(tmp_path / "two" / last)[0]
    )


def test_global_ot_coupling_pairs_alike_on_two_processes_and_one(tmp_path, faces):
    ot = ["--max-steps", 3, "--coupling", "ot"]
    ref = trained(faces, tmp_path / "one", *ot)
    assert_close(ref, trained(faces, tmp_path / "two", *ot, procs=2))
    # The local scope couples within each process's half only: other pairs, other weights.
    local = ["--objective-opt", "coupling_scope=local"]
    got = trained(faces, tmp_path / "local", *ot, *local, procs=2)
    assert any(not torch.allclose(ref[k], got[k], rtol=1e-4, atol=1e-5) for k in ref)


def test_meanflow_trains_under_ddp_like_on_one_process(tmp_path, faces):
    # Its Jacobian-vector product runs through DistributedDataParallel's forward.
    extra = ["--max-steps", 3, "--objective", "meanflow", "--backbone-opt", "two_times=true"]
    ref = trained(faces, tmp_path / "one", *extra)
    assert_close(ref, trained(faces, tmp_path / "two", *extra, procs=2))


def test_a_distilled_student_trains_under_ddp_like_on_one_process(tmp_path, faces):
    # Each process loads its own frozen teacher, outside DistributedDataParallel.
    teacher = tmp_path / "teacher"
    assert fmkit(*train_args(faces, teacher, "--max-steps", 2, "--phema", "off")).returncode == 0
    extra = ["--max-steps", 3, "--objective", "distill", "--init-from", teacher]
    ref = trained(faces, tmp_path / "one", *extra)
    assert_close(ref, trained(faces, tmp_path / "two", *extra, procs=2))


def test_resume_on_two_processes_is_exact_and_on_one_says_so(tmp_path, faces):
    full, split = tmp_path / "full", tmp_path / "split"
    assert fmkit(*train_args(faces, full, "--max-steps", 6), procs=2).returncode == 0
    assert fmkit(*train_args(faces, split, "--max-steps", 3), procs=2).returncode == 0
    resumed = fmkit(*train_args(faces, split, "--max-steps", 6, "--resume"), procs=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_close(
        weights(full / "checkpoint_final.safetensors")[0],
        weights(split / "checkpoint_final.safetensors")[0],
        exact=True,
    )
    other = fmkit(*train_args(faces, split, "--max-steps", 8, "--resume"))
    assert other.returncode == 0, other.stderr
    assert (
        "written by 2 process(es), this run has 1" in other.stdout
        and "not bit-exact" in other.stdout
    )


def test_batch_must_divide_over_processes(tmp_path, faces):
    result = fmkit(
        *train_args(faces, tmp_path / "r", "--max-steps", 1, "--batch-size", 6, "--grad-accum", 2),
        procs=2,
    )
    assert result.returncode != 0
    assert "must divide evenly over 2 process(es) x --grad-accum 2" in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("Error: rank")]
    assert len(ours) == 2  # one line per rank; torchrun's own failure report follows
    assert not any(
        "fmkit/" in line for line in result.stderr.splitlines() if line.strip().startswith("File")
    )


def test_webdataset_two_ranks_two_workers_unequal_shards_do_not_hang(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    shards = tmp_path / "shards"
    shards.mkdir()
    index = 0
    for s, count in enumerate([9, 5, 7, 3]):  # unequal on purpose
        with wds.TarWriter(str(shards / f"train-{s:06d}.tar")) as sink:
            for _ in range(count):
                jpg = io.BytesIO()
                Image.new("RGB", (16, 16), (index * 9 % 255, 40, 90)).save(jpg, format="JPEG")
                sink.write({"__key__": f"{index:06d}", "jpg": jpg.getvalue(), "cls": index})
                index += 1
    result = fmkit(
        "train",
        "--dataset",
        "imagenet",
        "--data-dir",
        shards,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--epochs",
        2,
        "--num-workers",
        2,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--save-every",
        1,
        "--output",
        tmp_path / "run",
        *TINY,
        procs=2,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoint_epoch_2.safetensors").is_file()


DYING = """
import os
import torch
from fmkit import hookimpl

class Dying(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 3:
            os._exit(7)  # this rank dies without a word
        return x * self.w

@hookimpl
def register_backbones(register):
    register("dying", lambda *, image_size, channels: Dying())
"""


def test_a_dead_rank_makes_the_others_exit_instead_of_hanging(tmp_path, faces):
    site = make_plugin_distribution(tmp_path / "site", "fmkit-dying", "fmkit_dying", DYING)
    extra = {"PYTHONPATH": str(site), "FMKIT_DISABLE_PLUGIN_AUTOLOAD": ""}
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        8,
        "--max-steps",
        50,
        "--backbone",
        "dying",
        "--dist-timeout",
        30,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        tmp_path / "run",
    ]
    result = fmkit(*args, procs=2, extra_env=extra, timeout=120)  # a hang fails here
    assert result.returncode != 0
    assert "exitcode  : 7" in result.stderr or "lost contact with another rank" in result.stderr


def test_flips_are_drawn_per_image_so_two_processes_match_one(tmp_path):
    # Random flips on: each image's flip depends on (seed, step, its index in the global batch).
    import numpy as np
    from PIL import Image

    faces = tmp_path / "halves"
    faces.mkdir()
    for i in range(32):
        pixels = np.zeros((16, 16, 3), dtype=np.uint8)
        pixels[:, : 2 + i % 12] = (i * 8, 255 - i * 8, 120)  # asymmetric: a flip shows
        Image.fromarray(pixels).save(faces / f"{i:02d}.png")
    one = fmkit(*train_args(faces, tmp_path / "one", "--max-steps", 4, "--hflip"))
    assert one.returncode == 0, one.stderr
    two = fmkit(*train_args(faces, tmp_path / "two", "--max-steps", 4, "--hflip"), procs=2)
    assert two.returncode == 0, two.stderr
    _, meta = checkpoint.load(tmp_path / "one" / "checkpoint_final.safetensors")
    assert meta["config"]["hflip"] is True
    assert_close(
        weights(tmp_path / "one" / "checkpoint_final.safetensors")[0],
        weights(tmp_path / "two" / "checkpoint_final.safetensors")[0],
    )
    off = fmkit(*train_args(faces, tmp_path / "off", "--max-steps", 4))  # flip=false
    ref, _ = weights(tmp_path / "one" / "checkpoint_final.safetensors")
    other, _ = weights(tmp_path / "off" / "checkpoint_final.safetensors")
    assert off.returncode == 0 and any(not torch.equal(ref[k], other[k]) for k in ref)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, faces):
    """SIGTERM to rank 1 alone (rank 0 never sees it): both finish the same step, rank 0 saves
    and says how to resume, and the resumed run on two processes ends where a whole one does."""
    import signal
    import time

    run, whole = tmp_path / "run", tmp_path / "whole"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "fmkit"]  # fmt: skip
    args = [*launcher, *map(str, train_args(faces, run, "--max-steps", 100000))]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env({"PYTHONUNBUFFERED": "1"}))  # fmt: skip
    deadline = time.monotonic() + 180
    while (
        not (run / "metrics.jsonl").exists()
        or len((run / "metrics.jsonl").read_text().splitlines()) < 2
    ):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)

    def rank(pid):
        variables = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        return dict(v.split(b"=", 1) for v in variables if b"=" in v).get(b"RANK")

    (rank1,) = [int(pid) for pid in children.stdout.split() if rank(pid) == b"1"]
    os.kill(rank1, signal.SIGTERM)
    _, stderr = job.communicate(timeout=180)
    assert job.returncode != 0
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    step = steps[-1]
    assert steps == list(range(1, step + 1))
    assert f"stopped by SIGTERM after step {step}; saved {run}/checkpoint_step_{step}." in stderr
    resumed = fmkit("train", "--output", run, "--resume", "--max-steps", step + 1, procs=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_close(
        trained(faces, whole, "--max-steps", step + 1, procs=2),
        weights(run / "checkpoint_final.safetensors")[0],
        exact=True,
    )

"""The run a user watches: the start-up summary, interrupts that save, --resume that keeps the
run's own settings, metrics that never repeat a step, paths that work from anywhere, grids
that show every class, learning-rate schedules and the W&B logger."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY, one_line_error, run_fmkit, train_args
from PIL import Image

from fmkit import checkpoint
from fmkit.generator import Generator
from fmkit.interrupt import StopRequests


def weights(path):
    tensors, _ = checkpoint.load(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def steps_logged(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def start_training(out, faces, *extra):
    """`fmkit train` in its own process (a real one, to send real signals to)."""
    args = [str(a) for a in train_args(faces, out, "--max-steps", 100000, *extra)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fmkit", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for_steps(run, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    process.kill()
    raise AssertionError("training never reached the steps")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_the_resume_is_bit_exact(tmp_path, faces, signum):
    stopped = tmp_path / "stopped"
    process = start_training(stopped, faces, "--lr-schedule", "constant")
    wait_for_steps(stopped, 3, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    step = steps_logged(stopped)[-1]  # the step it finished is logged and saved
    saved = stopped / f"checkpoint_step_{step}.safetensors"
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"stopped by {signal.Signals(signum).name} after step {step}; saved {saved}; "
        f"continue with: fmkit train --output {stopped} --resume"
    )
    assert "Traceback" not in stderr and saved.is_file()
    # Continue it as it says (plus a new limit), from another folder: no other flag is needed.
    # (Every run here is a process of its own, with the same torch threads: in-process runs
    # share whatever thread count an earlier test set, and float sums follow it.)
    resumed = run_fmkit("train", "--output", stopped, "--resume", "--max-steps", step + 2,
                        cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(stopped) == list(range(1, step + 3))
    # An uninterrupted run of as many steps holds the same weights, bit for bit.
    whole = tmp_path / "whole"
    args = train_args(faces, whole, "--max-steps", step + 2, "--lr-schedule", "constant")
    assert run_fmkit(*args).returncode == 0
    a = weights(whole / "checkpoint_final.safetensors")
    b = weights(stopped / "checkpoint_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_aborts_at_once():
    with StopRequests(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_keeps_the_runs_settings(tmp_path, faces, run_cli):
    run = tmp_path / "run"
    first = run_cli(*train_args(faces, run, "--max-steps", 3, "--lr", "1e-3", "--seed", 7))
    assert first.exit_code == 0, first.output
    # Only --output: the dataset, the model, the learning rate and the seed are the run's.
    more = run_cli("train", "--output", run, "--resume", "--max-steps", 5, "--log-every", 2)
    assert more.exit_code == 0, more.output
    _, meta = checkpoint.load(run / "checkpoint_final.safetensors")
    config = meta["config"]
    assert (config["lr"], config["seed"], config["dataset"], config["max_steps"]) == (
        1e-3,
        7,
        "folder",
        5,
    )
    assert config["backbone_opts"]["base_channels"] == 8 and config["log_every"] == 2
    # The last step is always logged, even off the --log-every grid, and none twice.
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    # A flag that would change what is learned is named, with both values.
    line = one_line_error(run_cli("train", "--output", run, "--resume", "--lr", "2e-3"))
    assert line.startswith(f"Error: --resume: --lr 0.002 differs from the run's 0.001 ({run})")
    line = one_line_error(
        run_cli("train", "--output", run, "--resume", "--backbone-opt", "base_channels=16")
    )
    assert "--backbone-opt base_channels 16 differs from the run's 8" in line
    # A run recorded before a kind had options: the option is still named, not a crash.
    config = json.loads((run / "config.json").read_text())
    del config["space_opts"]
    (run / "config.json").write_text(json.dumps(config))
    line = one_line_error(run_cli("train", "--output", run, "--resume", "--space-opt", "factor=2"))
    assert "--space-opt factor 2 differs from the run's unset" in line
    # The run named by a TOML file's output is the one resumed, with its own settings.
    toml = tmp_path / "more.toml"
    toml.write_text(f'output = "{run}"\nmax_steps = 6\n')
    from_file = run_cli("train", "--config", toml, "--resume")
    assert from_file.exit_code == 0 and "at step 5" in from_file.output, from_file.output
    # The same value again is no change.
    same = run_cli("train", "--output", run, "--resume", "--lr", "0.001", "--max-steps", 7)
    assert same.exit_code == 0, same.output


def test_metrics_never_repeat_a_step_after_a_resume(tmp_path, faces, run_cli):
    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 5, "--save-every-steps", 3)
    assert run_cli(*args).exit_code == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    # A run that died after step 5 was logged but before it was saved: step 3 is the newest
    # checkpoint, and steps 4 and 5 are trained again.
    (run / "checkpoint_final.safetensors").unlink()
    resumed = run_cli("train", "--output", run, "--resume", "--max-steps", 6)
    assert resumed.exit_code == 0 and "at step 3" in resumed.output
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_the_start_up_summary_says_what_will_run(tmp_path, faces, run_cli):
    run = tmp_path / "run"
    result = run_cli(*train_args(faces, run, "--max-steps", 2, "--warmup-steps", 5))
    assert result.exit_code == 0, result.output
    count = sum(p.numel() for p in Generator.load(run).module.parameters())
    assert f"model: unet ({count:,} parameters), flow_matching on the linear path\n" in (
        result.output
    )
    # Where it writes, and what the post-hoc EMA snapshots cost (8 bytes a parameter).
    assert f"\noutput: {run}; post-hoc EMA (sigma_rel 0.05, 0.1) every step, 0 MiB each\n" in (
        result.output
    )
    assert "data: folder, 24 images at 16x16; 6 steps per epoch, 2 steps" in result.output
    assert "device: cpu, fp32, compile off; batch 4 (1 process x 1 x 4); lr 0.0003 after 5 " \
        "warm-up steps" in result.output  # fmt: skip


def test_the_bar_says_what_it_does_and_adaptive_sampling_reports_its_nfe_as_it_goes(
    tmp_path, faces, run_cli
):
    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 2, "--save-every-steps", 1, "--log-every", 50)
    result = run_cli(*args)
    assert "saving checkpoint_step_1.safetensors..." in result.output
    assert "drawing final_samples_grid.png..." in result.output
    assert "loss=" in result.output  # from the first step, long before --log-every's 50th
    assert steps_logged(run) == [2]  # and metrics.jsonl ends with the last step
    seen = []
    samples = Generator.load(run).sample(3, solver="dopri5", batch_size=2, watch=seen.append)
    # Every evaluation of both batches is heard, counting up within each batch.
    assert len(seen) == sum(samples.nfe) and seen[0] == 1
    assert seen[samples.nfe[0] - 1] == samples.nfe[0] and seen[-1] == samples.nfe[1]


def test_a_relative_data_dir_is_recorded_so_the_run_works_from_anywhere(
    tmp_path, faces, run_cli, monkeypatch
):
    monkeypatch.chdir(faces.parent)
    run = tmp_path / "run"
    relative = train_args(faces.name, "run", "--max-steps", 2)
    assert run_cli(*relative).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = json.loads((run / "config.json").read_text())
    assert config["data_dir"] == str(faces) and config["output"] == str(run)
    result = run_cli("eval", "nll", "--checkpoint", run, "--num-images", 2, "--batch-size", 2,
                     "--solver-opt", "rtol=1e-2", "--solver-opt", "atol=1e-2")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["solver"] == "dopri5:atol=0.01:rtol=0.01"  # as typed, not a class name


def test_show_tells_the_steps_commands_use(run_cli):
    shown = run_cli("show", "solvers", "ab2").output
    assert "steps: int = 20" in shown


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_learning_rate_decays_to_zero_after_warm_up(tmp_path, faces, run_cli, schedule):
    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 6, "--warmup-steps", 2, "--lr-schedule", schedule)
    assert run_cli(*args).exit_code == 0
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    progress = [(step - 2) / 4 for step in range(2, 7)]
    decay = {
        "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "linear": [1 - p for p in progress],
    }[schedule]
    assert rates == pytest.approx([3e-4 * 0.5, *(3e-4 * d for d in decay)], abs=1e-12)
    assert rates[-1] == 0


def test_the_default_schedule_decays_when_the_run_has_a_known_length(tmp_path, faces, run_cli):
    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 4)
    at = args.index("--lr-schedule")
    result = run_cli(*args[:at], *args[at + 2 :])  # no --lr-schedule: the default
    assert result.exit_code == 0, result.output
    assert "lr 0.0003, cosine decay to 0" in result.output
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rates[0] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi / 4))) and rates[-1] == 0


def test_a_class_grid_shows_every_class(tmp_path, run_cli):
    data = tmp_path / "classes"
    for k in range(5):
        (data / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(data / f"c{k}" / f"{i}.png")
    run = tmp_path / "run"
    result = run_cli("train", "--dataset", "folder", "--data-dir", data, "--condition", "class",
                     "--image-size", 8, "--batch-size", 2, "--max-steps", 1, "--num-samples", 10,
                     "--sample-steps", 1, "--output", run, *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    captions = (run / "final_samples_grid.txt").read_text().splitlines()
    assert captions == [f"row {k + 1}: class=c{k}" for k in range(5)]
    with Image.open(run / "final_samples_grid.png") as grid:  # 5 rows of 2 images of 8 + 2
        assert grid.size == (2 * 10 + 2, 5 * 10 + 2)


def test_wandb_logs_offline_and_a_resume_continues_its_run(tmp_path, faces, run_cli, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert run_cli(*train_args(faces, run, "--max-steps", 2, "--logger", "wandb")).exit_code == 0
    run_id = (run / "wandb" / "fmkit-run-id").read_text()
    (first,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert b"train/loss" in first.read_bytes() and b"train/grad_norm" in first.read_bytes()
    assert run_cli("train", "--output", run, "--resume", "--max-steps", 3).exit_code == 0
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert (run / "wandb" / "fmkit-run-id").read_text() == run_id  # the same W&B run


def test_tensorboard_gets_the_same_scalars(tmp_path, faces, run_cli):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 3, "--logger", "tensorboard")
    assert run_cli(*args).exit_code == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == [(row["step"], pytest.approx(row["loss"])) for row in logged]


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(
    tmp_path, faces, run_cli, monkeypatch, logger
):
    monkeypatch.setitem(sys.modules, logger, None)  # what import sees when it is not installed
    run = tmp_path / "run"
    line = one_line_error(run_cli(*train_args(faces, run, "--logger", logger)))
    assert line == f"Error: --logger {logger} needs the {logger} package: pip install " \
        f"'fmkit[{logger}]'"  # fmt: skip
    assert not run.exists()

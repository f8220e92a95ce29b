"""Post-hoc EMA (fmkit.phema, `fmkit ema`, `fmkit eval ema`): the stored power-function
profiles, the least-squares reconstruction of any width, and the commands around them."""

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, train_args

from fmkit import checkpoint
from fmkit.generator import Generator
from fmkit.phema import (
    FOLDER,
    PowerEMA,
    gamma_to_sigma_rel,
    profile_weights,
    reconstruct,
    sigma_rel_to_gamma,
    snapshot_name,
)


def power_average(trajectory: torch.Tensor, gamma: float, at: int) -> torch.Tensor:
    """The power-function EMA of `trajectory` (T, D) after update `at`, computed directly:
    the recursion avg_n = beta_n avg_{n-1} + (1 - beta_n) theta_n, beta_n = (1 - 1/n)^(g+1)."""
    average = torch.zeros_like(trajectory[0])
    for n in range(1, at + 1):
        beta = (1 - 1 / n) ** (gamma + 1)
        average = beta * average + (1 - beta) * trajectory[n - 1]
    return average


def test_widths_and_exponents_are_each_others_inverse():
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-12)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's table
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def fake_run(tmp_path, trajectory, widths, every):
    """Run PowerEMA over a known parameter trajectory, storing snapshots as training does."""
    model = torch.nn.Linear(trajectory.shape[1], 1, bias=False).double()
    phema = PowerEMA(model, widths)
    (tmp_path / FOLDER).mkdir(parents=True)
    for n, theta in enumerate(trajectory, start=1):
        model.weight.data[0] = theta
        phema.update(model)
        if n % every == 0 or n == len(trajectory):
            phema.snapshot(tmp_path / snapshot_name(n))
    return phema


def test_the_profiles_are_power_function_averages_and_any_width_is_reconstructed(tmp_path):
    torch.manual_seed(0)
    trajectory = torch.randn(120, 6, dtype=torch.float64).cumsum(0)  # a random walk
    widths = (0.05, 0.10)
    phema = fake_run(tmp_path / "dense", trajectory, widths, every=1)
    for width, average in zip(widths, phema.averages, strict=True):
        direct = power_average(trajectory, sigma_rel_to_gamma(width), 120)
        assert torch.allclose(average[0][0], direct, rtol=1e-12, atol=1e-12)
        w = profile_weights(sigma_rel_to_gamma(width), 120, np.arange(1, 121))
        assert torch.allclose(torch.from_numpy(w) @ trajectory, direct, rtol=1e-12)
    # With a snapshot after every step any weighting of the steps is reachable: exact.
    for width in (0.03, 0.075, 0.15, 0.25):
        [rec] = reconstruct(tmp_path / "dense", (width,))
        direct = power_average(trajectory, sigma_rel_to_gamma(width), 120)
        assert rec.error < 1e-6  # the least-squares solve's round-off
        assert torch.allclose(rec.state["weight"][0], direct, rtol=1e-7, atol=1e-7)
    # At an earlier step, from the snapshots up to it.
    [rec] = reconstruct(tmp_path / "dense", (0.15,), step=60)
    assert torch.allclose(
        rec.state["weight"][0], power_average(trajectory, sigma_rel_to_gamma(0.15), 60), atol=1e-6
    )

    # Sparse snapshots (every 12 steps): a stored width at a stored step is exact, another
    # width close, within what the reported weighting error allows.
    fake_run(tmp_path / "sparse", trajectory, widths, every=12)
    [stored, between] = reconstruct(tmp_path / "sparse", (0.10, 0.075))
    assert torch.allclose(stored.state["weight"][0], phema.averages[1][0][0], rtol=1e-9)
    direct = power_average(trajectory, sigma_rel_to_gamma(0.075), 120)
    spread = (trajectory - direct).norm(dim=1).max()
    assert between.error < 0.02
    assert (between.state["weight"][0] - direct).norm() <= 2 * between.error * spread
    assert abs(sum(between.coefficients) - 1) < 1e-9


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A 6-step run storing snapshots every 2 steps."""
    from click.testing import CliRunner
    from conftest import small_faces

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("phema")
    faces = small_faces(root / "faces")
    run = root / "run"
    args = train_args(faces, run, "--max-steps", 6, "--phema-every", 2)
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "post-hoc EMA (sigma_rel 0.05, 0.1) every 2 steps" in result.output
    return {"root": root, "faces": faces, "run": run}


def test_training_stores_snapshots_and_resumes_them_exactly(phema_run, tmp_path, run_cli):
    run = phema_run["run"]
    assert sorted(p.name for p in (run / FOLDER).iterdir()) == [
        "phema_00000002.safetensors", "phema_00000004.safetensors", "phema_00000006.safetensors",
    ]  # fmt: skip
    split = tmp_path / "split"
    faces = phema_run["faces"]
    first = train_args(faces, split, "--max-steps", 3, "--phema-every", 2, "--save-every-steps", 3)
    assert run_cli(*first).exit_code == 0
    assert run_cli(*train_args(faces, split, "--max-steps", 6, "--resume")).exit_code == 0
    for name in ("phema_00000006.safetensors", "phema_00000004.safetensors"):
        a, _ = checkpoint.load(run / FOLDER / name)
        b, _ = checkpoint.load(split / FOLDER / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The interrupted run also stored step 3 (its last), which a reconstruction may use.
    assert (split / FOLDER / "phema_00000003.safetensors").is_file()
    # A run resumed from an earlier checkpoint drops the snapshots of the steps it retrains.
    (split / "checkpoint_final.safetensors").unlink()
    (split / "checkpoint_step_6.safetensors").unlink()
    assert checkpoint.read_metadata(checkpoint.find_latest(split))["step"] == 3
    resumed = run_cli(*train_args(faces, split, "--max-steps", 4, "--resume", "--phema-every", 3))
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in (split / FOLDER).iterdir()) == [
        "phema_00000002.safetensors", "phema_00000003.safetensors", "phema_00000004.safetensors",
    ]  # fmt: skip

    off = tmp_path / "off"
    assert run_cli(*train_args(faces, off, "--max-steps", 2, "--phema", "off")).exit_code == 0
    assert not (off / FOLDER).exists()
    line = one_line_error(
        run_cli("ema", "--run", off, "--sigma-rel", "0.1", "--out", tmp_path / "e")
    )
    assert "no post-hoc EMA snapshots" in line
    line = one_line_error(run_cli(*train_args(faces, tmp_path / "x", "--phema", "0.05,0.9")))
    assert "relative EMA width" in line and not (tmp_path / "x").exists()


def test_fmkit_ema_writes_model_folders_that_sample(phema_run, tmp_path, run_cli):
    run, out = phema_run["run"], tmp_path / "ema"
    result = run_cli("ema", "--run", run, "--sigma-rel", "0.05,0.2", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "ema.json",
        "sigma_rel-0.050",
        "sigma_rel-0.200",
    ]
    record = json.loads((out / "ema.json").read_text())
    assert [m["sigma_rel"] for m in record["models"]] == [0.05, 0.2]
    # sigma_rel 0.05 at the last snapshot is a stored profile: exactly its weights.
    stored, _ = checkpoint.load(run / FOLDER / "phema_00000006.safetensors")
    narrow = Generator.load(out / "sigma_rel-0.050").module.state_dict()
    assert all(torch.allclose(narrow[k], stored[f"0.{k}"], atol=1e-6) for k in narrow)
    wide = Generator.load(out / "sigma_rel-0.200")
    assert wide.sample(2, steps=2).images.shape == (2, 3, 16, 16)
    wide_state = wide.module.state_dict()
    assert any(not torch.equal(wide_state[k], narrow[k]) for k in narrow)
    # Never into another command's folder, and every check before the first write.
    line = one_line_error(run_cli("ema", "--run", run, "--sigma-rel", "0.1", "--out", run))
    assert "holds a training run" in line
    again = run_cli("ema", "--run", run, "--sigma-rel", "0.05,0.2", "--out", out)
    assert again.exit_code == 0, again.output  # its own folder: replaced


def test_eval_ema_scores_each_width_and_names_the_best(phema_run, tmp_path, run_cli):
    from conftest import benchmark

    weights = benchmark("gpu").random_inception(tmp_path / "inception.pth")
    out = tmp_path / "sweep"
    result = run_cli(
        "eval", "ema", "--checkpoint", phema_run["run"], "--sigma-rel", "0.05,0.2",
        "--inception-weights", weights, "--cache-dir", tmp_path / "cache", "--num-samples", 4,
        "--solver", "euler", "--steps", 2, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "ema.json").read_text())
    fids = {r["weights"]: r["fid"] for r in record["records"]}
    assert list(fids) == ["the run's EMA", "sigma_rel 0.050", "sigma_rel 0.200"]
    best = min(fids, key=fids.get)
    assert record["best"] == best and f"best: {best} (fid " in result.output
    assert "| **" + best + "** |" in (out / "ema.md").read_text()

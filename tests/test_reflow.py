"""Reflow end to end on the CPU: a tiny teacher's pairs written (and resumed after an
interruption), a reflow run started from the teacher's weights, one-step sampling, and the bad
inputs as one line each."""

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, train_args

from fmkit import Generator, checkpoint
from fmkit.prepared import PreparedArray
from fmkit.reflow import pair_noise


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from click.testing import CliRunner
    from conftest import write_image

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("reflow")
    for i in range(24):
        write_image(root / "faces" / f"{i:02d}.png", size=(20, 20), color=(i * 10, 90, 200))
    args = train_args(root / "faces", root / "teacher", "--max-steps", 20, "--lr", "1e-3")
    args += ["--sample-every", 0, "--save-every", 0]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "teacher"


def reflow_args(teacher, out, *extra):
    return ["reflow", "--teacher", teacher, "--num-pairs", 10, "--out", out, "--batch-size", 4,
            "--solver", "euler", "--steps", 4, "--device", "cpu", *extra]  # fmt: skip


def test_pairs_hold_the_teachers_images_of_their_seeds_noise(teacher, tmp_path, run_cli):
    result = run_cli(*reflow_args(teacher, tmp_path / "pairs"))
    assert result.exit_code == 0, result.output
    pairs = PreparedArray(tmp_path / "pairs", 16)
    assert len(pairs) == 10
    batch = pairs.__getitems__(list(range(10)))
    assert batch.noise.shape == batch.images.shape == (10, 3, 16, 16)
    # The noise regenerates from the stored seeds, and the teacher maps it to the stored image
    # (up to 8-bit rounding).
    seeds = torch.from_numpy(np.load(tmp_path / "pairs" / "noise_seeds.npy"))
    assert torch.equal(batch.noise, pair_noise(seeds, (3, 16, 16)))
    model = Generator.load(teacher)
    from fmkit import build_solver

    expected = model.generate(batch.noise[:4], build_solver("euler", steps=4)).x
    assert (batch.images[:4] - expected.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert len(set(seeds.tolist())) == 10


def test_an_interrupted_pair_folder_resumes_to_the_same_pairs(
    teacher, tmp_path, run_cli, monkeypatch
):
    assert run_cli(*reflow_args(teacher, tmp_path / "whole")).exit_code == 0
    calls = []
    original = Generator.generate

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second batch never finishes
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", interrupted)
    assert run_cli(*reflow_args(teacher, tmp_path / "cut")).exit_code != 0  # Ctrl-C: aborted
    assert json.loads((tmp_path / "cut" / "pairs.json").read_text())["done"] == 4
    assert not (tmp_path / "cut" / "meta.json").exists()
    monkeypatch.setattr(Generator, "generate", original)
    result = run_cli(*reflow_args(teacher, tmp_path / "cut"))
    assert result.exit_code == 0, result.output
    whole = np.load(tmp_path / "whole" / "images.npy")
    assert np.array_equal(np.load(tmp_path / "cut" / "images.npy"), whole)
    # Stopped during its very first batch, a folder resumes too.
    calls.clear()
    monkeypatch.setattr(
        Generator, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    assert run_cli(*reflow_args(teacher, tmp_path / "early")).exit_code != 0
    monkeypatch.setattr(Generator, "generate", original)
    assert run_cli(*reflow_args(teacher, tmp_path / "early")).exit_code == 0
    assert np.array_equal(np.load(tmp_path / "early" / "images.npy"), whole)
    # A folder of other settings is never extended.
    line = one_line_error(run_cli(*reflow_args(teacher, tmp_path / "cut", "--seed", 1)))
    assert "holds pairs made with seed=0, not 1" in line


def test_reflow_trains_from_the_teacher_and_samples_in_one_step(teacher, tmp_path, run_cli):
    assert run_cli(*reflow_args(teacher, tmp_path / "pairs")).exit_code == 0
    out = tmp_path / "2rf"
    # The command: a pair folder is read as the prepared array it is, no --dataset.
    args = ["train", "--objective", "reflow", "--data-dir"]
    args += [tmp_path / "pairs", "--init-from", teacher, "--batch-size", 4, "--max-steps", 2]
    args += ["--lr", "1e-12", "--num-samples", 2, "--sample-steps", 1, "--output", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    # The run starts from the teacher's EMA weights (a negligible learning rate keeps them),
    # with the teacher's backbone options as defaults.
    trained = Generator.load(out, ema=False)
    start = Generator.load(teacher)
    assert trained.spec.backbone_opts == start.spec.backbone_opts
    assert trained.spec.objective == "reflow"
    for name, value in start.module.state_dict().items():
        torch.testing.assert_close(trained.module.state_dict()[name], value, atol=1e-6, rtol=0)
    result = run_cli("sample", "--checkpoint", out, "--steps", 1, "--num-samples", 3,
                     "--output", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0 and "mean NFE 1.0" in result.output
    assert len(list((tmp_path / "s").glob("*.png"))) >= 3
    assert checkpoint.read_metadata(out / "checkpoint_final.safetensors")["step"] == 2


def test_bad_reflow_inputs_are_one_line_each(teacher, tmp_path, run_cli, faces):
    line = one_line_error(run_cli(*reflow_args(tmp_path / "missing", tmp_path / "p")))
    assert "does not exist" in line
    # Pairs at another resolution than the model being started from.
    small = tmp_path / "small"
    assert run_cli(*train_args(faces, small, "--image-size", 8, "--max-steps", 1)).exit_code == 0
    assert run_cli(*reflow_args(small, tmp_path / "p8")).exit_code == 0
    args = ["train", "--objective", "reflow", "--dataset", "prepared", "--data-dir"]
    args += [tmp_path / "p8", "--init-from", teacher, "--batch-size", 4, "--max-steps", 1]
    line = one_line_error(run_cli(*args, "--output", tmp_path / "x"))
    assert "8x8, not 16x16" in line
    # The reflow objective needs pairs; plain images have none.
    args = train_args(faces, tmp_path / "y", "--objective", "reflow", "--max-steps", 1)
    assert "trains on noise-image pairs" in one_line_error(run_cli(*args))


def test_the_reflow_loss_regresses_each_images_own_noise(teacher, tmp_path, run_cli):
    from fmkit import Batch, registry
    from fmkit.objective import Draws

    assert run_cli(*reflow_args(teacher, tmp_path / "pairs")).exit_code == 0
    batch = PreparedArray(tmp_path / "pairs", 16).__getitems__(list(range(8)))
    path = registry("paths").build("linear", {})
    objective = registry("objectives").build("reflow", {}, path=path)

    def still(x, t, cond=None):  # zero velocity: the loss is the target's mean square
        return torch.zeros_like(x)

    loss = objective.loss(still, batch, Draws(0, 0, 8, slice(0, 8))).value
    torch.testing.assert_close(loss, ((batch.images - batch.noise) ** 2).mean())
    other = Batch(batch.images, None, torch.roll(batch.noise, 1, 0))  # pairs swapped
    assert objective.loss(still, other, Draws(0, 0, 8, slice(0, 8))).value != loss


def test_flips_mirror_the_paired_noise_with_its_image():
    from fmkit import Batch
    from fmkit.augment import hflip
    from fmkit.objective import Draws

    images = torch.randn(64, 3, 4, 4)
    noise = images * 2  # any change that a flip of one and not the other would break
    flipped = hflip(Batch(images, None, noise), Draws(0, 3, 64, slice(0, 64), stream="flip"))
    changed = (flipped.images != images).flatten(1).any(1)
    assert 10 < changed.sum() < 54  # about half mirrored
    assert torch.equal(flipped.noise, flipped.images * 2)

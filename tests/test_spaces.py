"""Spaces: where a model generates. `patchify` is lossless and trains, samples, exports and
evaluates through the CLI like pixels; a space a format cannot express is one line."""

import json

import pytest
import torch
from conftest import one_line_error, small_faces, train_args
from PIL import Image

from fmkit.generator import Generator
from fmkit.space import build_space


@pytest.mark.parametrize("factor", [2, 4])
def test_patchify_is_exactly_invertible_and_moves_pixels_only(factor):
    space = build_space("patchify", {"factor": factor})
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    x = space.encode(images)
    assert x.shape == (3, 3 * factor**2, 16 // factor, 16 // factor)
    assert space.shape(3, 16) == (3 * factor**2, 16 // factor)
    assert torch.equal(space.decode(x), images)
    assert torch.equal(x.flatten().sort().values, images.flatten().sort().values)


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("space")
    faces = small_faces(root / "faces")
    run = root / "run"
    args = train_args(faces, run, "--max-steps", 3, "--space", "patchify", "--save-every-steps", 2)
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "in the patchify space" in result.output
    return run


def test_a_patchify_model_works_on_patches_and_gives_images(patch_run, tmp_path, run_cli):
    generator = Generator.load(patch_run)
    assert generator.spec.space == "patchify" and generator.spec.model_shape() == (12, 8)
    first = next(m for m in generator.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 12  # the backbone was built for 2x2 patches of 3 channels
    samples = generator.sample(2, steps=2, trajectory=3)
    assert samples.images.shape == (2, 3, 16, 16)
    assert samples.trajectory.shape == (3, 2, 3, 16, 16)  # states decoded too
    out = tmp_path / "samples"
    result = run_cli("sample", "--checkpoint", patch_run, "--num-samples", 2, "--output", out)
    assert result.exit_code == 0, result.output
    with Image.open(out / "00000.png") as image:
        assert image.size == (16, 16)
    with Image.open(patch_run / "final_samples_grid.png") as grid:  # 4 images of 16 + padding
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)


def test_a_patchify_model_exports_to_its_folder_and_nowhere_it_cannot_be_read(
    patch_run, tmp_path, run_cli
):
    folder = tmp_path / "model"
    assert run_cli("export", "--checkpoint", patch_run, "--out", folder).exit_code == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["space"] == "patchify"
    again = Generator.from_pretrained(folder).sample(2, steps=2, seed=1).images
    assert torch.equal(again, Generator.load(patch_run).sample(2, steps=2, seed=1).images)
    line = one_line_error(
        run_cli("export", "--checkpoint", patch_run, "--format", "onnx", "--out", tmp_path / "o")
    )
    assert line == (
        "Error: export: --format onnx takes models that generate in pixels; this one generates "
        "in the space 'patchify' (--format fmkit keeps it)"
    )
    assert not (tmp_path / "o").exists()


def test_bits_per_dim_in_a_lossless_space(patch_run, run_cli):
    result = run_cli("eval", "nll", "--checkpoint", patch_run, "--num-images", 2,
                     "--batch-size", 2, "--solver-opt", "rtol=1e-2", "--solver-opt", "atol=1e-2")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert 0 < report["bits_per_dim"] < 16


def test_resume_in_patchify_space_is_bit_exact(patch_run, tmp_path, run_cli):
    from fmkit import checkpoint

    config = json.loads((patch_run / "config.json").read_text())
    whole = tmp_path / "whole"
    faces = config["data_dir"]
    assert (
        run_cli(*train_args(faces, whole, "--max-steps", 3, "--space", "patchify")).exit_code == 0
    )
    split = tmp_path / "split"
    assert (
        run_cli(*train_args(faces, split, "--max-steps", 2, "--space", "patchify")).exit_code == 0
    )
    assert run_cli("train", "--output", split, "--resume", "--max-steps", 3).exit_code == 0
    a, _ = checkpoint.load(whole / "checkpoint_final.safetensors")
    b, _ = checkpoint.load(split / "checkpoint_final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.")))


def test_space_mistakes_are_one_line_before_anything_is_written(tmp_path, faces, run_cli):
    run = tmp_path / "run"
    odd = train_args(faces, run, "--image-size", 18, "--space", "patchify",
                     "--space-opt", "factor=4")  # fmt: skip
    line = one_line_error(run_cli(*odd))
    assert line == "Error: space 'patchify': --image-size 18 is not a multiple of the patch " \
        "factor 4"  # fmt: skip
    assert "unknown space 'latent'" in one_line_error(
        run_cli(*train_args(faces, run, "--space", "latent"))
    )
    assert not run.exists()
    listed = run_cli("list", "spaces").output
    assert "pixels" in listed and "patchify" in listed


def test_init_from_a_model_of_another_space_is_one_line(patch_run, tmp_path, run_cli):
    faces = small_faces(tmp_path / "faces")
    args = train_args(faces, tmp_path / "run", "--max-steps", 1, "--init-from", patch_run,
                      "--space", "pixels")  # fmt: skip
    line = one_line_error(run_cli(*args))
    assert "space (patchify, not pixels)" in line and not (tmp_path / "run").exists()

"""Conditional training and classifier-free guidance end to end on the CPU: a two-class set
learned well enough to obey, CelebA attributes from a CelebA-shaped folder, guidance's NFE,
the weights folder, and every bad input as one line."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, one_line_error
from PIL import Image

from fmkit import Generator, build_solver, checkpoint

RED, BLUE = (220, 30, 30), (30, 30, 220)


def colour_folder(root, per_class=16, size=12):
    """red/ and blue/ subfolders of noisy solid squares: the class is visible in the colour."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", RED), ("blue", BLUE)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def redness(images):
    """(N,) red minus blue channel mean: > 0 for red-looking images."""
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("cond")
    data = colour_folder(root / "colours")
    out = root / "run"
    args = ["train", "--dataset", "folder", "--data-dir", data, "--condition", "class"]
    args += ["--image-size", 8, "--batch-size", 16, "--max-steps", 300, "--lr", "1e-3"]
    args += ["--save-every", 0, "--sample-every", 0, "--num-samples", 4, "--sample-steps", 4]
    # A 128-wide time embedding (the default before fmkit 0.2.0): at 8 channels and 300 steps
    # the unconditional half is only learnt well enough with it.
    args += ["--output", out, *TINY, "--backbone-opt", "time_emb_dim=128"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_a_class_conditional_model_makes_the_class_asked_for(two_class_run):
    generator = Generator.load(two_class_run)
    assert generator.data.condition.names == ("blue", "red")  # subfolders, sorted
    for name, sign in (("red", 1), ("blue", -1)):
        samples = generator.sample(32, cond={"class": name}, steps=10, guidance=2.0, seed=1)
        right = (sign * redness(samples.images) > 0).float().mean().item()
        assert right >= 0.9, (name, right)  # chance is 0.5
    # Unconditional samples from the same model (every condition dropped) mix both colours.
    free = redness(Generator.load(two_class_run).sample(64, steps=10, seed=2).images)
    assert 0.15 < (free > 0).float().mean().item() < 0.85


def test_guidance_costs_at_most_twice_the_nfe_and_the_interval_less(two_class_run):
    generator = Generator.load(two_class_run)
    plain = generator.sample(4, cond={"class": "red"}, steps=10, guidance=1.0)
    guided = generator.sample(4, cond={"class": "red"}, steps=10, guidance=3.0, interval=(0, 1))
    limited = generator.sample(
        4, cond={"class": "red"}, steps=10, guidance=3.0, interval=(0.0, 0.45)
    )
    starts = build_solver("ab2", steps=10).grid(0.0, 1.0)[:-1]  # the default solver's
    assert plain.nfe == [10] and guided.nfe == [20]
    assert limited.nfe == [10 + int((starts <= 0.45).sum())] and 10 < limited.nfe[0] < 20
    assert not torch.equal(plain.images, guided.images)
    # By default a conditional model is guided (w = 1.5) at 0.2 <= t <= 0.8: the steps that
    # start there cost two evaluations.
    default = generator.sample(4, cond={"class": "red"}, steps=10)
    inside = int(((starts >= 0.2) & (starts <= 0.8)).sum())
    assert 0 < inside < 10 and default.nfe == [10 + inside]
    assert not torch.equal(default.images, plain.images)
    # An unconditional request is never guided.
    assert generator.sample(4, steps=10).nfe == [10]


def test_sample_cli_with_conditions_a_file_and_guidance(two_class_run, tmp_path, run_cli):
    listed = run_cli("list-conditions", "--checkpoint", two_class_run)
    assert "2 classes" in listed.output and "0  blue" in listed.output
    out = tmp_path / "s"
    result = run_cli("sample", "--checkpoint", two_class_run, "--cond", "class=red",
                     "--guidance", 2, "--guidance-interval", "0,1", "--num-samples", 3,
                     "--steps", 5, "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "NFE 10" in result.output  # 5 guided steps, two passes each
    result = run_cli("sample", "--checkpoint", two_class_run, "--cond", "class=red",
                     "--num-samples", 3, "--steps", 5, "--output", out)  # fmt: skip
    # By default ab2 on the shift grid (t = 0, 0.08, 0.18, 0.33, 0.57), guided at 0.2 <= t <= 0.8.
    assert "(ab2:5, mean NFE 7.0, fp32)" in result.output
    spec = tmp_path / "conds.txt"
    spec.write_text("class=red\n# a comment\nclass=blue\nclass=#1\n")
    result = run_cli("sample", "--checkpoint", two_class_run, "--cond-file", spec,
                     "--steps", 5, "--output", tmp_path / "f")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "f").glob("0*.png")) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]


def test_bad_conditions_are_one_line_each(two_class_run, tmp_path, run_cli, faces):
    base = ["sample", "--checkpoint", two_class_run, "--num-samples", 1, "--steps", 1]
    base += ["--output", tmp_path / "s"]
    assert "unknown class 'green'" in one_line_error(run_cli(*base, "--cond", "class=green"))
    assert "takes class=NAME, not 'Smiling'" in one_line_error(
        run_cli(*base, "--cond", "Smiling=1")
    )
    assert "expects NAME=VALUE" in one_line_error(run_cli(*base, "--cond", "red"))
    assert "--guidance-interval needs" in one_line_error(
        run_cli(*base, "--guidance-interval", "0.8,0.2")
    )
    # An unconditional checkpoint takes no conditions.
    plain = tmp_path / "plain"
    assert run_cli("train", "--dataset", "folder", "--data-dir", faces, "--image-size", 8,
                   "--batch-size", 4, "--max-steps", 1, "--num-samples", 1, "--output", plain,
                   *TINY).exit_code == 0  # fmt: skip
    line = one_line_error(run_cli("sample", "--checkpoint", plain, "--cond", "class=red"))
    assert "trained without conditions" in line


def test_a_conditional_model_round_trips_through_its_folder(two_class_run, tmp_path, run_cli):
    assert run_cli("export", "--checkpoint", two_class_run, "--out", tmp_path / "m").exit_code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["data"]["condition"] == {"kind": "class", "names": ["blue", "red"]}
    a = Generator.load(two_class_run).sample(4, cond={"class": "red"}, guidance=2.0, steps=4)
    b = Generator.load(tmp_path / "m").sample(4, cond={"class": "red"}, guidance=2.0, steps=4)
    assert torch.equal(a.images, b.images)


def test_grids_show_one_condition_per_row_with_captions(two_class_run):
    captions = (two_class_run / "final_samples_grid.txt").read_text().splitlines()
    assert captions == ["row 1: class=blue", "row 2: class=red"]


def celeba_folder(root, n=12):
    """A CelebA-shaped folder (already extracted): images, partition and attributes."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = ["5_o_Clock_Shadow", "Eyeglasses", "Smiling"]
    rows, parts = [], []
    for i in range(1, n + 1):
        pixels = np.full((218, 178, 3), (20 * i, 100, 200 - 10 * i), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img_align_celeba" / f"{i:06d}.jpg")
        values = [1 if (i >> a) & 1 else -1 for a in range(len(names))]
        rows.append(f"{i:06d}.jpg " + " ".join(map(str, values)))
        parts.append(f"{i:06d}.jpg 0")
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(names)}\n" + "\n".join(rows))
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return names


def test_celeba_attributes_train_and_sample_by_name(tmp_path, run_cli, monkeypatch):
    import fmkit_plugins.celeba as celeba

    names = celeba_folder(tmp_path)
    # The files' MD5s are the test's own (the real ones are checked against the official).
    from fmkit.download import md5sum

    specs = tuple(
        celeba.CelebAFile(s.name, s.gdrive_id, md5sum(tmp_path / "celeba" / s.name))
        if (tmp_path / "celeba" / s.name).exists()
        else s
        for s in celeba.FILES
    )
    monkeypatch.setattr(celeba, "FILES", specs)
    out = tmp_path / "run"
    args = ["train", "--dataset", "celeba", "--data-dir", tmp_path, "--condition", "attributes"]
    args += ["--dataset-opt", "download=false", "--image-size", 8, "--batch-size", 4]
    args += ["--max-steps", 2, "--num-samples", 9, "--sample-steps", 2, *TINY]
    result = run_cli(*args, "--dataset-opt", "attributes=Smiling,Eyeglasses", "--output", out)
    assert result.exit_code == 0, result.output
    _, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["model"]["data"]["condition"]["names"] == ["Smiling", "Eyeglasses"]
    captions = (out / "final_samples_grid.txt").read_text().splitlines()
    assert captions[:3] == [
        "row 1: unconditional (all attributes unspecified)",
        "row 2: Smiling=1",
        "row 3: Smiling=0",
    ]
    generator = Generator.load(out)
    samples = generator.sample(2, cond={"Smiling": 1}, guidance=2.0, interval=(0, 1), steps=2)
    assert samples.images.shape == (2, 3, 8, 8) and samples.nfe == [4]
    base = [
        "sample",
        "--checkpoint",
        out,
        "--num-samples",
        1,
        "--steps",
        1,
        "--output",
        tmp_path / "s",
    ]
    line = one_line_error(run_cli(*base, "--cond", "Smilling=1"))
    assert "unknown attribute 'Smilling'; did you mean 'Smiling'?" in line
    line = one_line_error(run_cli(*base, "--cond", "Smiling=2"))
    assert "attribute Smiling must be 0 or 1" in line
    line = one_line_error(
        run_cli(*args, "--dataset-opt", "attributes=Smile", "--output", tmp_path / "x")
    )
    assert "unknown CelebA attribute 'Smile'" in line and names[2] in line

"""Objectives and conditions as plugins: a test plugin adds an objective, a conditional backbone
and a labelled dataset, trains and samples with no core file touched; the Generator's folder
round trip; checkpoints written before model specs existed still sample."""

import json

import pytest
import torch
from conftest import TINY, one_line_error, write_image
from torch import nn

from fmkit import (
    Condition,
    DataSpec,
    Draws,
    Generator,
    Loss,
    Objective,
    checkpoint,
    hookimpl,
    registry,
)


class TimeWeighted(Objective):
    """Flow matching whose squared error is weighted by (1 + t): a minimal custom objective."""

    def __init__(self, path, weight: float):
        self.path, self.weight = path, weight

    def loss(self, model, batch, draws: Draws) -> Loss:
        x1 = batch.images
        x0 = draws.normal(*x1.shape[1:])
        t = draws.uniform()
        target = self.path.sample(x0, x1, t)
        error = (model(target.x_t, t, batch.cond) - target.velocity).square().flatten(1).mean(1)
        value = ((1 + self.weight * t) * error).mean()
        return Loss(value, {"unweighted": error.mean().detach()})


class ToyConditional(nn.Module):
    """A one-layer velocity with a class embedding; records the conditions it was given."""

    seen: list = []

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.embed = nn.Embedding(classes + 1, channels)  # the last row: no class given

    def forward(self, x, t, cond=None):
        labels = torch.full((len(x),), self.embed.num_embeddings - 1, dtype=torch.long)
        if cond is not None:
            labels = torch.where(cond["class"] >= 0, cond["class"], labels)
        ToyConditional.seen.append(None if cond is None else cond["class"].tolist())
        h = torch.cat([x, t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x)], 1)
        return self.conv(h) + self.embed(labels.to(x.device))[:, :, None, None]


class TwoColours(torch.utils.data.Dataset):
    """Red images are class 0, blue ones class 1."""

    def __init__(self, image_size: int, labelled: bool):
        self.image_size, self.labelled = image_size, labelled

    def __len__(self):
        return 16

    def __getitem__(self, i):
        image = -torch.ones(3, self.image_size, self.image_size)
        image[0 if i % 2 == 0 else 2] = 1.0
        return (image, i % 2) if self.labelled else image

    def describe(self) -> DataSpec:
        condition = Condition("class", ("red", "blue")) if self.labelled else Condition()
        return DataSpec(3, self.image_size, condition)


class Plugin:
    @hookimpl
    def register_objectives(self, register):
        def time_weighted(*, path, weight: float = 1.0):
            """Flow matching weighted by 1 + weight * t."""
            return TimeWeighted(path, weight)

        register("time_weighted", time_weighted)

    @hookimpl
    def register_backbones(self, register):
        def toy_conditional(*, image_size, channels, data: DataSpec | None = None):
            """A toy backbone that takes a class."""
            classes = data.condition.size if data is not None else 0
            return ToyConditional(channels, classes)

        register("toy-conditional", toy_conditional)

        def toy_plain(*, image_size, channels):
            """A toy backbone without conditions."""
            return ToyConditional(channels, 0)

        register("toy-plain", toy_plain)

    @hookimpl
    def register_datasets(self, register):
        def two_colours(*, root, image_size, split, condition: str = "none"):
            """Red and blue squares, labelled by colour."""
            return TwoColours(image_size, labelled=condition == "class")

        register("two-colours", two_colours)

        def plain_colours(*, root, image_size, split):
            """Red and blue squares, no labels."""
            return TwoColours(image_size, labelled=False)

        register("plain-colours", plain_colours)


@pytest.fixture
def plugin(register_plugin):
    ToyConditional.seen.clear()
    return register_plugin(Plugin(), "test-objective-plugin")


def test_a_plugin_objective_trains_a_conditional_backbone_and_samples(tmp_path, run_cli, plugin):
    out = tmp_path / "run"
    args = ["train", "--dataset", "two-colours", "--backbone", "toy-conditional"]
    args += [
        "--objective",
        "time_weighted",
        "--objective-opt",
        "weight=2.0",
        "--condition",
        "class",
    ]
    args += ["--image-size", 8, "--batch-size", 4, "--max-steps", 2, "--log-every", 1]
    args += ["--num-samples", 2, "--sample-steps", 2, "--output", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    # The backbone was called with the dataset's labels (red 0, blue 1) during training (and
    # with -1, unspecified, in the unconditional half of the guided grid at the end).
    trained_on = [c for c in ToyConditional.seen if c is not None]
    assert trained_on and all(set(c) <= {0, 1, -1} for c in trained_on)
    assert sum(set(c) <= {0, 1} for c in trained_on) >= 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("unweighted" in r and r["loss"] > 0 for r in rows)
    _, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["model"]["objective"] == "time_weighted"
    assert meta["model"]["objective_opts"] == {"weight": 2.0}
    assert meta["model"]["data"]["condition"] == {"kind": "class", "names": ["red", "blue"]}
    # Sampling rebuilds the conditional backbone and passes conditions through.
    generator = Generator.load(out)
    assert generator.data.condition.names == ("red", "blue")
    ToyConditional.seen.clear()
    cond = {"class": torch.tensor([1, 0, 1])}
    samples = generator.sample(3, cond=cond, solver="euler", steps=2, guidance=1.0)
    assert samples.images.shape == (3, 3, 8, 8) and samples.nfe == [2]
    assert ToyConditional.seen == [[1, 0, 1], [1, 0, 1]]
    assert run_cli("sample", "--checkpoint", out, "--num-samples", 2, "--steps", 2,
                   "--output", tmp_path / "s").exit_code == 0  # fmt: skip


def test_condition_errors_are_one_line(tmp_path, run_cli, plugin):
    base = ["train", "--image-size", 8, "--batch-size", 4, "--max-steps", 1]
    base += ["--output", tmp_path / "run"]
    # A backbone whose factory takes no `data` cannot be conditioned.
    line = one_line_error(
        run_cli(
            *base, "--dataset", "two-colours", "--condition", "class", "--backbone", "toy-plain"
        )
    )
    assert "backbone 'toy-plain' takes no conditions" in line
    # A dataset without a `condition` parameter yields none; one that has other labels says so.
    line = one_line_error(run_cli(*base, "--dataset", "plain-colours", "--condition", "class"))
    assert "dataset 'plain-colours' yields no conditions" in line
    line = one_line_error(run_cli(*base, "--dataset", "two-colours", "--condition", "attributes"))
    assert "--condition attributes: the dataset yields no conditions (not attributes)" in line
    # Flow matching's own flags do not apply to another objective.
    line = one_line_error(
        run_cli(*base, "--dataset", "two-colours", "--backbone", "toy-conditional",
                "--objective", "time_weighted", "--time-sampling", "logit_normal")
    )  # fmt: skip
    assert "--time-sampling is not an option of objective 'time_weighted'" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("gen")
    faces = root / "faces"
    for i in range(8):
        write_image(faces / f"{i}.png", size=(16, 16), color=(30 * i, 90, 200 - 20 * i))
    out = root / "run"
    args = ["train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16]
    args += ["--batch-size", 4, "--max-steps", 3, "--num-samples", 1, "--sample-steps", 1]
    args += ["--output", out, *TINY]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_generator_folder_round_trip_gives_the_same_images(trained, tmp_path, run_cli):
    result = run_cli("export", "--checkpoint", trained, "--out", tmp_path / "model")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        ".fmkit-folder.json",  # the mark: fmkit export wrote these
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model"]["backbone"] == "unet" and "optimizer" not in json.dumps(config)
    original = Generator.from_checkpoint(trained).sample(4, seed=7, steps=5)
    loaded = Generator.from_pretrained(tmp_path / "model").sample(4, seed=7, steps=5)
    assert torch.equal(original.images, loaded.images)
    # Only EMA weights travel: the file is far smaller than the training checkpoint.
    weights = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert weights * 2 < (trained / "checkpoint_final.safetensors").stat().st_size
    # fp16 halves the weights and samples nearly the same images.
    assert (
        run_cli("export", "--checkpoint", trained, "--out", tmp_path / "half", "--fp16").exit_code
        == 0
    )
    half = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half < 0.6 * weights
    close = Generator.from_pretrained(tmp_path / "half").sample(4, seed=7, steps=5)
    assert (close.images - original.images).abs().max() < 0.05
    # fmkit sample takes the folder too.
    sampled = run_cli("sample", "--checkpoint", tmp_path / "model", "--num-samples", 2,
                      "--steps", 2, "--output", tmp_path / "s")  # fmt: skip
    assert sampled.exit_code == 0, sampled.output


def test_a_checkpoint_from_before_model_specs_still_samples(trained, tmp_path, run_cli):
    tensors, meta = checkpoint.load(trained / "checkpoint_final.safetensors")
    # What fmkit 0.1.0 wrote: no model spec, flips and labels as dataset options.
    config = dict(meta["config"])
    for key in ("objective", "objective_opts", "condition", "hflip", "split", "cache_dataset"):
        config.pop(key, None)
    config["dataset_opts"] = {"flip": True}
    old = {k: v for k, v in meta.items() if k != "model"}
    old["config"] = config
    path = tmp_path / "checkpoint_step_3.safetensors"
    checkpoint.save(path, tensors, old)
    result = run_cli("sample", "--checkpoint", path, "--num-samples", 2, "--steps", 2,
                     "--output", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.output
    now = Generator.from_checkpoint(trained / "checkpoint_final.safetensors").sample(2, steps=2)
    before = Generator.from_checkpoint(path).sample(2, steps=2)
    assert torch.equal(now.images, before.images)


def test_a_foreign_folder_is_a_clear_error(tmp_path, run_cli):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"nope")
    line = one_line_error(run_cli("sample", "--checkpoint", folder))
    assert "is not an fmkit model folder" in line


def test_objectives_are_listed_and_shown(run_cli):
    assert (
        "flow_matching  Flow matching (Lipman et al. 2023)" in run_cli("list", "objectives").output
    )
    shown = run_cli("show", "objectives", "flow_matching")
    assert "time_sampling: 'uniform' | 'logit_normal' | 'edm' = 'logit_normal'" in shown.output
    assert "path:" not in shown.output  # fmkit passes the path; it is no option
    assert registry("objectives").accepts("flow_matching", "time_sampling")

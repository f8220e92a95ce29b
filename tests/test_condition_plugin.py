"""Conditions are an open plugin kind: a test plugin adds a continuous condition (a brightness
in [0, 1], unspecified as NaN) and a dataset that yields it, and fmkit trains on it, samples
with guidance, couples noise by it, lists it, serves its control to the demo and exports the
model, without a line of core change."""

import json
import math

import pytest
import torch
from conftest import TINY, one_line_error
from torch import nn

from fmkit import Condition, ConditionKind, DataSpec, FmkitError, Generator, hookimpl


class BrightnessEmbedding(nn.Module):
    """A linear map of the K values, with a learned vector for each unspecified one."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.linear = nn.Linear(size, dim)
        self.unspecified = nn.Parameter(torch.randn(size, dim) * 0.02)

    def forward(self, cond, batch: int, device) -> torch.Tensor:
        values = torch.full((batch, self.size), math.nan, device=device)
        if cond is not None and "brightness" in cond:
            values = cond["brightness"].to(device, torch.float32)
        missing = torch.isnan(values)  # (B, K)
        known = torch.where(missing, torch.zeros_like(values), values)
        return self.linear(known) + missing.to(known.dtype) @ self.unspecified  # (B, dim)


class Brightness(ConditionKind):
    def collate(self, labels):
        return torch.tensor([[float(x)] for x in labels])  # (B, 1)

    def unspecified_like(self, values):
        return torch.full_like(values, math.nan)

    def group_key(self, values):
        return torch.nan_to_num(values, nan=-1.0).mul(4).round()  # quarters share noise

    def embedding(self, condition, dim):
        return BrightnessEmbedding(condition.size, dim)

    def encode(self, condition, wanted):
        values = [math.nan] * condition.size
        for name, value in wanted.items():
            if name not in condition.names:
                raise FmkitError(f"unknown brightness '{name}'; available: {condition.names}")
            try:
                values[condition.names.index(name)] = float(value)
            except (TypeError, ValueError):
                raise FmkitError(f"{name} must be a number, got {value!r}") from None
        return torch.tensor(values)

    def describe(self, condition):
        return [f"{condition.size} brightness value(s) in [0, 1]:", *condition.names]

    def grid_rows(self, condition, rows):
        levels = [0.0, 0.5, 1.0]
        name = condition.names[0]
        return [(f"{name}={levels[r % 3]}", {name: levels[r % 3]}) for r in range(rows)]

    def controls(self, condition):
        return [{"key": n, "label": n, "number": {"min": 0, "max": 1, "step": 0.1}}
                for n in condition.names]  # fmt: skip

    def examples(self, condition, generator):
        return torch.tensor([[math.nan], [0.0], [0.5], [1.0]])

    def export_text(self, condition):
        return {
            "onnx": "Brightness-conditional: `brightness` is (B, 1) float32, NaN unspecified.",
            "onnx_dtype": "np.float32",
            "unspecified_onnx": "np.full(({batch}, 1), np.nan, np.float32)",
        }


class BrightnessImages(torch.utils.data.Dataset):
    """24 grey images whose brightness is their label."""

    def __init__(self, image_size: int, condition: str) -> None:
        self.image_size, self.condition = image_size, condition
        self.levels = [i / 23 for i in range(24)]
        self.labels = self.levels if condition == "brightness" else None

    def describe(self):
        names = ("brightness",) if self.condition == "brightness" else ()
        return DataSpec(3, self.image_size, Condition(self.condition, names))

    def __len__(self):
        return len(self.levels)

    def __getitem__(self, i):
        image = torch.full((3, self.image_size, self.image_size), self.levels[i] * 2 - 1)
        return image if self.labels is None else (image, self.levels[i])


class Plugin:
    @hookimpl
    def register_conditions(self, register):
        register("brightness", Brightness)

    @hookimpl
    def register_datasets(self, register):
        def bright(*, root: str, image_size: int, split: str = "train", condition: str = "none"):
            """Grey images labelled with their brightness."""
            return BrightnessImages(image_size, condition)

        register("bright", bright)


@pytest.fixture
def plugin(register_plugin):
    return register_plugin(Plugin(), "brightness-plugin")


def train(run_cli, out, *extra):
    return run_cli("train", "--dataset", "bright", "--data-dir", "unused", "--image-size", 16,
                   "--condition", "brightness", "--batch-size", 8, "--max-steps", 3,
                   "--num-samples", 3, "--sample-steps", 2, "--log-every", 1,
                   "--sample-every-steps", 3, "--output", out, *TINY, *extra)  # fmt: skip


def test_a_new_condition_kind_trains_samples_guides_couples_and_exports(plugin, tmp_path, run_cli):
    run = tmp_path / "run"
    # A UNet diffusers could express, so its export fails on the condition alone.
    exportable = ["--backbone-opt", "base_channels=64", "--backbone-opt", "time_emb_dim=64",
                  "--backbone-opt", "channel_mult=1,1"]  # fmt: skip
    result = train(run_cli, run, "--coupling", "ot", *exportable)
    assert result.exit_code == 0, result.output
    generator = Generator.load(run)
    assert generator.data.condition == Condition("brightness", ("brightness",))
    # Grids are captioned by the kind.
    assert (run / "samples_step_3.txt").read_text().splitlines()[0] == "row 1: brightness=0.0"
    # list-conditions and sampling with guidance (guided steps cost two evaluations).
    listed = run_cli("list-conditions", "--checkpoint", run)
    assert "brightness value(s)" in listed.output
    args = ["sample", "--checkpoint", run, "--num-samples", 2, "--solver", "euler", "--steps",
            4, "--guidance-interval", "0,1"]  # fmt: skip
    guided = run_cli(*args, "--cond", "brightness=0.9", "--guidance", 3, "--output", tmp_path / "g")
    assert guided.exit_code == 0, guided.output
    assert "NFE 8" in guided.output
    plain = run_cli(*args, "--cond", "brightness=0.9", "--guidance", 1, "--output", tmp_path / "p")
    assert "NFE 4" in plain.output
    dark = run_cli(*args, "--cond", "brightness=0.1", "--guidance", 1, "--output", tmp_path / "d")
    assert dark.exit_code == 0
    assert (tmp_path / "p" / "00000.png").read_bytes() != (
        tmp_path / "d" / "00000.png"
    ).read_bytes()
    assert "must be a number" in one_line_error(
        run_cli(*args, "--cond", "brightness=dim", "--output", tmp_path / "x")
    )
    # The demo's page gets the kind's control.
    from fmkit.demo import Demo

    described = Demo(generator).describe()["condition"]["controls"]
    assert described == [{"key": "brightness", "label": "brightness",
                          "number": {"min": 0, "max": 1, "step": 0.1}}]  # fmt: skip
    answer = Demo(generator).generate({"count": 1, "steps": 2, "cond": {"brightness": 0.5}})
    assert answer["nfe"] > 2  # guided by default
    # Exports: the fmkit folder, and ONNX checked on every state (NaN included).
    assert run_cli("export", "--checkpoint", run, "--out", tmp_path / "m").exit_code == 0
    again = Generator.load(tmp_path / "m").sample(2, cond={"brightness": 0.9}, steps=2)
    assert torch.isfinite(again.images).all()
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    onnx = run_cli("export", "--checkpoint", run, "--out", tmp_path / "o", "--format", "onnx")
    assert onnx.exit_code == 0, onnx.output
    assert "`brightness` is (B, 1) float32" in (tmp_path / "o" / "README.md").read_text()
    line = one_line_error(run_cli("export", "--checkpoint", run, "--out", tmp_path / "df",
                                  "--format", "diffusers"))  # fmt: skip
    assert "class_labels cannot express it" in line


def test_the_kind_groups_noise_for_ot_coupling(plugin):
    from fmkit_plugins.coupling import couple

    noise, images = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    cond = {"brightness": torch.tensor([[0.0], [0.0], [1.0], [1.0], [0.0], [1.0], [0.0], [1.0]])}
    paired, _ = couple(noise, images, 0, cond, "ot", False, 0.05, None)
    rows = [int(torch.nonzero((noise == p).all(-1).all(-1).all(-1))[0]) for p in paired]
    dark = {0, 1, 4, 6}
    assert all((i in dark) == (r in dark) for i, r in enumerate(rows))  # never across groups


def test_an_unknown_condition_kind_lists_the_known_ones(run_cli, tmp_path, faces):
    line = one_line_error(run_cli("train", "--dataset", "folder", "--data-dir", faces,
                                  "--condition", "brightnes", "--output", tmp_path / "r"))  # fmt: skip
    assert "unknown condition kind 'brightnes'" in line and "attributes, class" in line
    assert not (tmp_path / "r").exists()


def test_a_prepared_array_keeps_the_kinds_labels(plugin, tmp_path, run_cli):
    result = run_cli("prepare", "bright", "--data-dir", "unused", "--image-size", 8,
                     "--condition", "brightness", "--out", tmp_path / "p")  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["condition"] == {"kind": "brightness", "names": ["brightness"]}
    from fmkit.prepared import PreparedArray

    data = PreparedArray(tmp_path / "p", 8, condition="brightness")
    assert data.labels.dtype == torch.float32 and data.labels.shape == (24, 1)


def test_a_prepared_array_of_the_kind_trains(plugin, tmp_path, run_cli):
    """`--dataset prepared --condition KIND` reads any kind's labels back."""
    assert run_cli("prepare", "bright", "--data-dir", "unused", "--image-size", 16,
                   "--condition", "brightness", "--out", tmp_path / "p").exit_code == 0  # fmt: skip
    result = run_cli("train", "--dataset", "prepared", "--data-dir", tmp_path / "p",
                     "--image-size", 16, "--condition", "brightness", "--batch-size", 8,
                     "--max-steps", 1, "--num-samples", 2, "--output", tmp_path / "r", *TINY)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Generator.load(tmp_path / "r").data.condition.kind == "brightness"

"""`fmkit export --format diffusers|onnx`: the exports load in diffusers / onnxruntime alone and
compute fmkit's velocity; a diffusers sampling loop reproduces fmkit's Euler samples."""

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_image

from fmkit import Condition, FmkitError, Generator
from fmkit.export import check_inputs
from fmkit.solver import solver_from_spec
from fmkit_plugins.export_diffusers import diffusers_labels
from fmkit_plugins.unet import UNet

diffusers = pytest.importorskip("diffusers", reason="the export extra (diffusers) is not installed")

# The smallest UNet diffusers can express: every GroupNorm has 32 groups (widths multiples of 64)
# and the sinusoidal time embedding is base_channels wide.
EXPORTABLE = [
    "--backbone-opt", "base_channels=64", "--backbone-opt", "time_emb_dim=64",
    "--backbone-opt", "channel_mult=1,1", "--backbone-opt", "attn_resolutions=8",
    "--backbone-opt", "num_res_blocks=1",
]  # fmt: skip


def _train(root, *extra):
    from click.testing import CliRunner

    from fmkit.cli import cli

    for i in range(16):
        write_image(root / "data" / ("red" if i % 2 else "blue") / f"{i}.png", size=(16, 16),
                    color=(40 + 200 * (i % 2), 60 + 5 * i, 240 - 200 * (i % 2)))  # fmt: skip
    args = ["train", "--dataset", "folder", "--data-dir", root / "data", "--image-size", 16]
    args += ["--batch-size", 4, "--max-steps", 3, "--num-samples", 4, "--sample-steps", 2]
    args += ["--output", root / "run", *extra]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("export"), *EXPORTABLE)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("export_cls"), *EXPORTABLE, "--condition", "class")


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_diffusers_export_loads_in_diffusers_and_matches_the_velocity(run, run_cli, tmp_path):
    result = run_cli(
        "export", "--checkpoint", run, "--out", tmp_path / "d", "--format", "diffusers"
    )
    assert result.exit_code == 0, result.output
    assert "matches fmkit's" in result.output
    generator = Generator.load(run)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "d" / "unet").eval()
    x, t, _ = check_inputs(generator, 6)[0]
    with torch.no_grad():
        theirs = unet(x, 1000 * t).sample
        ours = generator.module(x, t)
    assert _relative(theirs, ours) <= 1e-5
    assert "invert_sigmas" in (tmp_path / "d" / "README.md").read_text()


@pytest.mark.parametrize("grid", ["uniform", "shift"])
def test_a_diffusers_sampling_loop_reproduces_fmkit_euler(run, run_cli, tmp_path, grid):
    """The loop of the export's README, with fmkit's uniform or default shift grid."""
    assert run_cli("export", "--checkpoint", run, "--out", tmp_path / "d", "--format",
                   "diffusers").exit_code == 0  # fmt: skip
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "d" / "unet").eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        tmp_path / "d" / "scheduler"
    )
    steps = 6
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    if grid == "shift":
        sigmas = sigmas * 3 / (1 + 2 * sigmas)
    scheduler.set_timesteps(sigmas=sigmas)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = noise.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            x = scheduler.step(unet(x, timestep).sample, timestep, x).prev_sample
    ours = Generator.load(run).generate(noise, solver_from_spec(f"euler:{steps}:schedule={grid}"))
    assert ours.nfe == steps
    assert _relative(x, ours.x) <= 1e-5


def test_an_unconditional_export_is_a_diffusers_pipeline(run, run_cli, tmp_path):
    assert run_cli("export", "--checkpoint", run, "--out", tmp_path / "d", "--format",
                   "diffusers").exit_code == 0  # fmt: skip
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "d")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_a_class_conditional_export_takes_class_labels(class_run, run_cli, tmp_path):
    result = run_cli("export", "--checkpoint", class_run, "--out", tmp_path / "d", "--format",
                     "diffusers")  # fmt: skip
    assert result.exit_code == 0, result.output
    note = (tmp_path / "d" / "README.md").read_text()
    assert "0 blue, 1 red" in note and '2 for "unspecified"' in note
    generator = Generator.load(class_run)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "d" / "unet").eval()
    x, t, _ = check_inputs(generator, 3)[0]
    cond = {"class": torch.tensor([0, 1, -1])}
    with torch.no_grad():
        theirs = unet(x, 1000 * t, class_labels=torch.tensor([0, 1, 2])).sample
        ours = generator.module(x, t, cond)
    assert _relative(theirs, ours) <= 1e-5
    assert torch.equal(diffusers_labels(generator, cond), torch.tensor([0, 1, 2]))


def test_attribute_and_scale_shift_unets_map_exactly():
    """Attribute vectors become one class label (base-3 digits); ADM scale-shift blocks and
    several heads map too."""
    torch.manual_seed(0)
    model = UNet(in_channels=1, time_emb_dim=64, base_channels=64, channel_mult=(1, 2, 2),
                 attn_resolutions=(8, 4), image_size=16, num_heads=2, scale_shift=True,
                 condition=Condition("attributes", ("a", "b", "c")))  # fmt: skip
    for p in model.parameters():
        p.data.normal_(0, 0.05)  # zero-initialised layers would hide a wrong mapping
    config, state = model.to_diffusers()
    unet = diffusers.UNet2DModel(**config).eval()
    unet.load_state_dict(state, strict=True)
    states = torch.tensor([[0, 1, -1], [1, 1, 1], [-1, -1, -1], [0, 0, 1]])
    labels = (torch.where(states < 0, 2, states) * torch.tensor([1, 3, 9])).sum(1)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0.0, 0.3, 0.7, 1.0])
    with torch.no_grad():
        theirs = unet(x, 1000 * t, class_labels=labels).sample
        ours = model.eval()(x, t, {"attributes": states})
    assert _relative(theirs, ours) <= 1e-5


def test_models_diffusers_cannot_express_are_one_line_errors():
    # The seed's UNet embeds time in 128 dimensions, wider than its first level; the error
    # names the flag that makes a model exportable.
    model = UNet(time_emb_dim=128, base_channels=64, channel_mult=(1, 1), image_size=16,
                 attn_resolutions=(8,))  # fmt: skip
    with pytest.raises(FmkitError, match="--backbone-opt time_emb_dim=64"):
        model.to_diffusers()
    model = UNet(time_emb_dim=64, base_channels=64, channel_mult=(1, 1), image_size=16,
                 attn_resolutions=(8,), two_times=True)  # fmt: skip
    with pytest.raises(FmkitError, match="second time r"):
        model.to_diffusers()
    wide_first = UNet(time_emb_dim=64, base_channels=64, channel_mult=(2, 2), image_size=16,
                      attn_resolutions=(8,))  # fmt: skip
    with pytest.raises(FmkitError, match="channel_mult"):
        wide_first.to_diffusers()


def test_onnx_export_runs_in_onnxruntime_like_pytorch(class_run, run_cli, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    result = run_cli("export", "--checkpoint", class_run, "--out", tmp_path / "o", "--format",
                     "onnx", "--batch-size", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    assert [i.name for i in session.get_inputs()] == ["x", "t", "class"]
    generator = Generator.load(class_run)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.1, 0.5, 0.9])
    labels = torch.tensor([1, -1, 0])
    (theirs,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "class": labels.numpy()})
    with torch.no_grad():
        ours = generator.module(x, t, {"class": labels})
    assert _relative(torch.from_numpy(theirs), ours) <= 1e-4
    assert '-1 for "unspecified"' in (tmp_path / "o" / "README.md").read_text()


def test_export_flag_mistakes_are_one_line_errors(run, run_cli, tmp_path):
    result = run_cli("export", "--checkpoint", run, "--out", tmp_path / "o", "--format", "onnx",
                     "--fp16")  # fmt: skip
    assert "--fp16" in one_line_error(result)
    result = run_cli("export", "--checkpoint", run, "--out", tmp_path / "o", "--format", "tflite")
    assert result.exit_code != 0 and "tflite" in result.output
    blocked = tmp_path / "file"
    blocked.write_text("a file where the output folder's parent should be")
    for fmt in ("fmkit", "diffusers", "onnx"):
        result = run_cli("export", "--checkpoint", run, "--out", blocked / "o", "--format", fmt)
        assert f"cannot write {blocked / 'o'}" in one_line_error(result)


def test_a_missing_export_extra_is_a_one_line_error(run, run_cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    result = run_cli("export", "--checkpoint", run, "--out", tmp_path / "o", "--format", "onnx")
    assert "pip install 'fmkit[export]'" in one_line_error(result)


@pytest.mark.parametrize("fmt", ["diffusers", "onnx"])
def test_the_sampling_loops_of_the_exported_readmes_run_as_written(
    class_run, run_cli, tmp_path, monkeypatch, fmt
):
    import re

    pytest.importorskip("onnxruntime")
    out = tmp_path / fmt
    batch = ["--batch-size", 2] if fmt == "onnx" else []  # an option of the onnx exporter
    assert run_cli("export", "--checkpoint", class_run, "--out", out, "--format", fmt,
                   *batch).exit_code == 0  # fmt: skip
    blocks = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    assert blocks
    monkeypatch.chdir(out)
    for code in blocks:
        scope = {}
        exec(code.replace("THIS_FOLDER", str(out)), scope)  # noqa: S102
        result = scope.get("images", scope.get("x"))
        assert np.isfinite(np.asarray(result)).all()


class NpzExporter:
    """A test plugin's exporter: the weights as one NumPy .npz file, checked by reading it back."""

    @staticmethod
    def factory(*, compressed: bool = False):
        from fmkit.export import Exporter
        from fmkit.folders import FolderKind

        class Npz(Exporter):
            folder = FolderKind("npz", "an npz export", "fmkit export --format npz")

            def write(self, generator, staging):
                state = {
                    k: v.detach().cpu().numpy() for k, v in generator.module.state_dict().items()
                }
                (np.savez_compressed if compressed else np.savez)(staging / "weights.npz", **state)
                loaded = np.load(staging / "weights.npz")
                return max(float(np.abs(loaded[k] - v).max()) for k, v in state.items())

        return Npz()

    from fmkit import hookimpl

    @hookimpl
    def register_exporters(self, register):
        register("npz", self.factory)


def test_an_exporter_plugin_works_through_the_cli(run, run_cli, tmp_path, register_plugin):
    """Exporters are an open plugin kind: `--format NAME` and `--export-opt` reach a plugin's."""
    register_plugin(NpzExporter(), "npz-plugin")
    result = run_cli("export", "--checkpoint", run, "--out", tmp_path / "n", "--format", "npz",
                     "--export-opt", "compressed=true")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 1 files" in result.output and "matches fmkit's to 0.0e+00" in result.output
    assert (tmp_path / "n" / "weights.npz").is_file()
    # Its folder is its own: the fmkit exporter refuses it, and it refuses a model folder.
    assert "holds an npz export" in one_line_error(
        run_cli("export", "--checkpoint", run, "--out", tmp_path / "n")
    )
    line = one_line_error(run_cli("export", "--checkpoint", run, "--out", tmp_path / "x",
                                  "--format", "npz", "--export-opt", "level=3"))  # fmt: skip
    assert "unknown option 'level'" in line
    line = one_line_error(run_cli("export", "--checkpoint", run, "--out", tmp_path / "y",
                                  "--format", "tflite"))  # fmt: skip
    assert "unknown exporter 'tflite'" in line and "diffusers, fmkit, npz, onnx" in line
    assert "--fp16 is not an option of exporter 'npz'" in one_line_error(
        run_cli("export", "--checkpoint", run, "--out", tmp_path / "z", "--format", "npz", "--fp16")
    )


def test_the_model_fmkit_train_makes_by_default_exports_to_diffusers(run_cli, tmp_path):
    """The default UNet's time embedding is as wide as its first level (64), as diffusers'
    UNet2DModel needs; before fmkit 0.2.0 it was 128 and the default model was refused."""
    for i in range(4):
        write_image(tmp_path / "faces" / f"{i}.png", size=(64, 64), color=(60 * i, 90, 200))
    result = run_cli("train", "--dataset", "folder", "--data-dir", tmp_path / "faces",
                     "--batch-size", 2, "--max-steps", 1, "--num-samples", 1, "--sample-steps",
                     1, "--output", tmp_path / "run")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "d",
                     "--format", "diffusers")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "matches fmkit's" in result.output


def test_a_model_of_fmkit_0_1_keeps_its_128_wide_time_embedding(tmp_path):
    """Models written before the default changed (fmkit < 0.2.0, time_emb_dim left out) still
    load: the UNet declares the old default (`defaults_before`)."""
    import json

    from fmkit import DataSpec, checkpoint
    from fmkit.generator import ModelSpec

    old = UNet(in_channels=3, time_emb_dim=128, base_channels=8, channel_mult=(1, 2),
               attn_resolutions=(8,), num_res_blocks=1, image_size=16)  # fmt: skip
    spec = ModelSpec("unet", {"base_channels": 8, "channel_mult": [1, 2], "attn_resolutions": [8],
                              "num_res_blocks": 1}, DataSpec(3, 16))  # fmt: skip
    tensors = {f"{p}.{k}": v.clone() for p in ("model", "ema") for k, v in old.state_dict().items()}
    meta = {"model": {k: v for k, v in spec.to_dict().items() if k not in ("sampling", "fmkit_version")},
            "fmkit_version": "0.1.0", "step": 1}  # fmt: skip
    checkpoint.save(tmp_path / "checkpoint_final.safetensors", tensors, meta)
    loaded = Generator.load(tmp_path)
    assert loaded.module.time_emb_dim == 128
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    torch.testing.assert_close(loaded.module(x, t), old.eval()(x, t))
    # The same spec from today's fmkit means today's default, 8 wide: not these weights.
    checkpoint.save(tmp_path / "new" / "checkpoint_final.safetensors", tensors,
                    {**meta, "fmkit_version": "0.2.0"})  # fmt: skip
    with pytest.raises(FmkitError, match="different architecture"):
        Generator.load(tmp_path / "new")
    # A model folder of fmkit 0.1.0: its config.json says which fmkit wrote it.
    folder = tmp_path / "folder"
    Generator(loaded.spec, loaded.module).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"].pop("fmkit_version")
    config["model"]["backbone_opts"].pop("time_emb_dim", None)
    (folder / "config.json").write_text(json.dumps({**config, "fmkit_version": "0.1.0"}))
    assert Generator.load(folder).module.time_emb_dim == 128

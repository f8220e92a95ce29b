"""fmkit-dit, tested as an installed third-party plugin."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fmkit import FmkitError, registry


def expected_parameters(width, depth, patch, channels=3, mlp_ratio=4, freq=256):
    """Independent count from the published shapes: patch embed, time MLP, blocks, final layer."""
    hidden = width * mlp_ratio
    embed = channels * patch * patch * width + width
    time = freq * width + width + width * width + width
    block = (
        width * 3 * width
        + 3 * width  # qkv
        + width * width
        + width  # attention output
        + width * hidden
        + hidden
        + hidden * width
        + width  # MLP
        + width * 6 * width
        + 6 * width  # adaLN-Zero modulation
    )
    final = (
        width * 2 * width + 2 * width + width * patch * patch * channels + patch * patch * channels
    )
    return embed + time + depth * block + final


@pytest.mark.parametrize(
    "preset, width, depth, heads, patch",
    [("DiT-S/2", 384, 12, 6, 2), ("DiT-B/2", 768, 12, 12, 2), ("DiT-S/4", 384, 12, 6, 4)],
)
def test_presets_match_published_configurations(preset, width, depth, heads, patch):
    model = registry("backbones").build("dit", {"preset": preset}, image_size=32, channels=3)
    assert len(model.blocks) == depth and model.patch == patch
    assert model.blocks[0].heads == heads and model.blocks[0].qkv.in_features == width
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(width, depth, patch)


def test_forward_shape_and_time_conditioning():
    torch.manual_seed(0)
    model = registry("backbones").build(
        "dit", {"preset": "DiT-S/4", "depth": 2, "width": 64, "heads": 4}, image_size=16, channels=3
    )
    for p in model.parameters():  # adaLN-Zero starts every output at zero: give it weights
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    a, b = model(x, torch.tensor([0.1, 0.1])), model(x, torch.tensor([0.9, 0.9]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(FmkitError, match="not a multiple of patch size 4"):
        registry("backbones").build("dit", {"preset": "DiT-S/4"}, image_size=18, channels=3)
    with pytest.raises(FmkitError, match="unknown preset 'DiT-Q/2'"):
        registry("backbones").build("dit", {"preset": "DiT-Q/2"}, image_size=16, channels=3)


def fmkit(*args, autoload=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_")}
    if not autoload:
        env["FMKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fmkit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_listed_trained_and_sampled_by_name(tmp_path):
    import json

    from PIL import Image

    assert "dit" in fmkit("list", "backbones").stdout
    assert "dit" not in fmkit("list", "backbones", autoload=False).stdout
    plugins = json.loads(fmkit("plugins").stdout)
    assert {"name": "fmkit-dit", "version": "0.1.0", "hooks": ["register_backbones"]} in plugins

    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 80, 160)).save(tmp_path / f"{i}.png")
    run = tmp_path / "run"
    trained = fmkit(
        "train",
        "--backbone",
        "dit",
        "--backbone-opt",
        "preset=DiT-S/4",
        "--backbone-opt",
        "depth=2",
        "--backbone-opt",
        "width=64",
        "--backbone-opt",
        "heads=4",
        "--dataset",
        "folder",
        "--data-dir",
        tmp_path,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--max-steps",
        2,
        "--num-samples",
        2,
        "--sample-steps",
        2,
        "--output",
        run,
    )
    assert trained.returncode == 0, trained.stderr
    sampled = fmkit(
        "sample", "--checkpoint", run, "--steps", 3, "--num-samples", 2, "--output", tmp_path / "s"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "s" / "grid.png").is_file()

    # diffusers has no DiT for plain images: the export says so in one line; ONNX takes any
    # backbone (when fmkit's export extra is installed).
    exported = fmkit(
        "export", "--checkpoint", run, "--out", tmp_path / "d", "--format", "diffusers"
    )
    assert exported.returncode == 1 and len(exported.stderr.strip().splitlines()) == 1
    assert "backbone 'dit' has no diffusers mapping" in exported.stderr
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        onnx = fmkit("export", "--checkpoint", run, "--out", tmp_path / "o", "--format", "onnx")
        assert onnx.returncode == 0, onnx.stderr
        assert (tmp_path / "o" / "model.onnx").is_file()

    # Without the plugin, the checkpoint says which distribution to install.
    missing = fmkit("sample", "--checkpoint", run, "--output", tmp_path / "t", autoload=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"Error: {run / 'checkpoint_final.safetensors'} needs backbone 'dit', which is not "
        "installed; it came from the distribution fmkit-dit 0.1.0: pip install fmkit-dit"
    ]


def test_two_times_trains_meanflow_and_samples_in_one_step(tmp_path):
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 80, 160)).save(tmp_path / f"{i}.png")
    run = tmp_path / "run"
    small = ["--backbone-opt", "preset=DiT-S/4", "--backbone-opt", "depth=2",
             "--backbone-opt", "width=64", "--backbone-opt", "heads=4"]  # fmt: skip
    trained = fmkit(
        "train", "--backbone", "dit", *small, "--objective", "meanflow",
        "--dataset", "folder", "--data-dir", tmp_path, "--image-size", 16, "--batch-size", 4,
        "--max-steps", 2, "--num-samples", 2,
        "--sample-steps", 1, "--output", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    sampled = fmkit("sample", "--checkpoint", run, "--steps", 1, "--num-samples", 2,
                    "--output", tmp_path / "s")  # fmt: skip
    assert sampled.returncode == 0 and "mean NFE 1.0" in sampled.stdout, sampled.stderr
    # MeanFlow switches the second time on by itself; switching it off is refused in one line,
    # before the run folder exists.
    refused = fmkit(
        "train", "--backbone", "dit", *small, "--backbone-opt", "two_times=false",
        "--objective", "meanflow", "--dataset", "folder", "--data-dir", tmp_path,
        "--image-size", 16, "--batch-size", 4, "--max-steps", 1, "--output", tmp_path / "x",
    )  # fmt: skip
    assert refused.returncode == 1 and "two_times=true" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_the_second_time_reaches_the_output():
    from fmkit_dit.model import DiT

    torch.manual_seed(0)
    model = DiT(16, 3, 4, 64, 2, 4, two_times=True)
    for p in model.gap.mlp[-1].parameters():  # trained: no longer the zero initialisation
        torch.nn.init.normal_(p, std=0.5)
    for p in model.final.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.3)
    same = model(x, t, {"r": t})
    assert torch.equal(same, model(x, t))  # r = t when absent
    assert not torch.allclose(same, model(x, t, {"r": torch.full((2,), 0.9)}))

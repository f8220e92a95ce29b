"""fmkit train / fmkit sample end to end on a tiny UNet and a folder of images the test writes."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY, one_line_error, train_args, write_image
from PIL import Image

from fmkit import Generator, checkpoint, hookimpl
from fmkit.pixels import to_uint8
from fmkit.solver import solver_from_spec


def test_train_writes_checkpoints_grids_metrics_then_sample(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    result = run_cli(*train_args(faces, out, "--epochs", 2, "--save-every", 1, "--sample-every", 2))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    for expected in (
        "checkpoint_epoch_1.safetensors",
        "checkpoint_epoch_2.safetensors",
        "checkpoint_final.safetensors",
        "samples_epoch_2.png",
        "final_samples_grid.png",
        "metrics.jsonl",
        "config.json",
    ):
        assert expected in names
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["step"] == 12  # 24 images / 4 per batch * 2 epochs
    assert {"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= set(rows[0])
    assert json.loads((out / "config.json").read_text())["backbone_opts"]["channel_mult"] == [1, 2]
    _, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["step"] == 12 and meta["components"]["backbone"]["name"] == "unet"

    # Sampling needs no architecture flags: the run directory says it all.
    s = tmp_path / "s"
    result = run_cli(
        "sample",
        "--checkpoint",
        out,
        "--solver",
        "rk4",
        "--steps",
        3,
        "--num-samples",
        5,
        "--batch-size",
        3,
        "--output",
        s,
        "--trajectory",
        4,
    )
    assert result.exit_code == 0, result.output
    assert "batch 1/2: 3 images, NFE 12" in result.output
    assert "images/s" in result.output
    assert sorted(p.name for p in s.iterdir()) == [
        ".fmkit-folder.json",  # the mark: these files are fmkit sample's
        "00000.png",
        "00001.png",
        "00002.png",
        "00003.png",
        "00004.png",
        "grid.png",
        "trajectory.png",
    ]
    # Each PNG is the model's image through pixels.to_uint8 (seed 0, the default), and the
    # grid puts them 2 a row (int(sqrt(5))) with 2 black pixels around each.
    expected = Generator.load(out).sample(5, solver=solver_from_spec("rk4:3"), seed=0, batch_size=3)
    grid = torch.from_numpy(np.array(Image.open(s / "grid.png"))).permute(2, 0, 1)
    assert grid.shape == (3, 2 + 3 * 18, 2 + 2 * 18)
    for i, image in enumerate(to_uint8(expected.images)):
        saved = torch.from_numpy(np.array(Image.open(s / f"{i:05d}.png"))).permute(2, 0, 1)
        assert torch.equal(saved, image)
        top, left = 2 + (i // 2) * 18, 2 + (i % 2) * 18
        assert torch.equal(grid[:, top : top + 16, left : left + 16], image)
        grid[:, top : top + 16, left : left + 16] = 0
    assert grid.max() == 0  # the rest is padding (and the empty sixth cell)
    adaptive = run_cli(
        "sample",
        "--checkpoint",
        out,
        "--solver",
        "dopri5",
        "--num-samples",
        2,
        "--output",
        tmp_path / "d",
        "--solver-opt",
        "rtol=1e-3",
        "--steps",
        7,
    )
    assert "note: dopri5 is adaptive; --steps is ignored" in adaptive.output


def test_same_seed_same_images(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    run_cli(*train_args(faces, out, "--max-steps", 2))
    images = []
    for name in ("a", "b"):
        run_cli(
            "sample",
            "--checkpoint",
            out,
            "--steps",
            4,
            "--num-samples",
            3,
            "--seed",
            5,
            "--output",
            tmp_path / name,
        )
        images.append((tmp_path / name / "grid.png").read_bytes())
    assert images[0] == images[1]


def weights(path):
    tensors, _ = checkpoint.load(path)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}


def test_resume_is_bit_identical(tmp_path, faces, run_cli):
    full, split = tmp_path / "full", tmp_path / "split"
    # 24 images / batch 4 = 6 steps an epoch: stop mid-epoch (step 8) and at an epoch edge.
    assert run_cli(*train_args(faces, full, "--max-steps", 10)).exit_code == 0
    assert run_cli(*train_args(faces, split, "--max-steps", 8)).exit_code == 0
    result = run_cli(*train_args(faces, split, "--max-steps", 10, "--resume"))
    assert "resumed from" in result.output and "at step 8" in result.output
    a, b = (
        weights(full / "checkpoint_final.safetensors"),
        weights(split / "checkpoint_final.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_step_1.safetensors"
    checkpoint.save(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(fd):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr("fmkit.folders.os.fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": torch.zeros(3)}, {"step": 2})
    tensors, meta = checkpoint.load(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, run_cli, writer):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "checkpoint_epoch_50.pt"
    if writer == "torch":
        torch.save({"x": Payload(marker)}, bad)
    else:
        bad.write_bytes(pickle.dumps(Payload(marker)))
    result = run_cli("sample", "--checkpoint", bad, "--output", tmp_path / "s")
    assert "only loads .safetensors" in one_line_error(result)
    assert not marker.exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, run_cli):
    bad = tmp_path / "checkpoint_final.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "corrupt or truncated" in one_line_error(run_cli("sample", "--checkpoint", bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no readable checkpoint" in one_line_error(run_cli("sample", "--checkpoint", empty))


class NaNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return x * self.w * (float("nan") if self.calls > 3 else 1.0)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path, faces, run_cli, register_plugin
):
    class Plugin:
        @hookimpl
        def register_backbones(self, register):
            register("nan-net", lambda *, image_size, channels: NaNNet())

    register_plugin(Plugin(), "nan-plugin")
    out = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--backbone",
        "nan-net",
        "--save-every-steps",
        2,
        "--num-samples",
        2,
        "--sample-steps",
        2,
        "--output",
        out,
    ]
    line = one_line_error(run_cli(*args))
    assert "loss became nan at step 4" in line and "checkpoint_step_2.safetensors" in line
    assert not (out / "checkpoint_final.safetensors").exists()
    _, meta = checkpoint.load(out / "checkpoint_step_2.safetensors")
    assert meta["step"] == 2


def test_config_file_and_flag_override(tmp_path, faces, run_cli):
    config = tmp_path / "train.toml"
    config.write_text(
        f'dataset = "folder"\ndata-dir = "{faces}"\nimage_size = 16\nbatch_size = 8\nmax_steps = 2\n'
        "lr = 0.5\n[backbone_opts]\nbase_channels = 8\nchannel_mult = [1, 2]\nattn_resolutions = [8]\n"
    )
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--config",
        config,
        "--lr",
        "0.001",
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.001 and saved["batch_size"] == 8 and saved["max_steps"] == 2
    config.write_text("batchsize = 3\n")
    assert "unknown key 'batchsize'" in one_line_error(run_cli("train", "--config", config))


def test_missing_backbone_plugin_names_the_distribution(tmp_path, faces, run_cli, register_plugin):
    class Plugin:
        @hookimpl
        def register_backbones(self, register):
            register("gone-net", lambda *, image_size, channels: NaNNet())

    out = tmp_path / "run"
    register_plugin(Plugin(), "gone-plugin")
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--backbone",
        "gone-net",
        "--max-steps",
        1,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        out,
    ]
    assert run_cli(*args).exit_code == 0
    from fmkit.plugins import pm

    pm.unregister(name="gone-plugin")
    line = one_line_error(run_cli("sample", "--checkpoint", out))
    assert "needs backbone 'gone-net', which is not installed" in line and "pip install" in line
    pm.register(Plugin(), name="gone-plugin")  # the fixture unregisters it


def test_bad_train_flags_are_one_line_errors(tmp_path, faces, run_cli):
    base = ["train", "--dataset", "folder", "--data-dir", faces, "--output", tmp_path / "r"]
    assert "unknown backbone 'unte'" in one_line_error(run_cli(*base, "--backbone", "unte"))
    assert "fewer than --batch-size" in one_line_error(
        run_cli(*base, "--batch-size", 100, "--image-size", 16, *TINY)
    )
    assert "unknown dataset 'celbea'; did you mean 'celeba'?" in one_line_error(
        run_cli("train", "--dataset", "celbea")
    )


def test_a_new_run_never_overwrites_earlier_checkpoints(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    assert run_cli(*train_args(faces, out, "--max-steps", 1)).exit_code == 0
    before = (out / "checkpoint_final.safetensors").read_bytes()
    line = one_line_error(run_cli(*train_args(faces, out, "--max-steps", 2)))
    assert "already holds checkpoints; pass --resume" in line
    assert (out / "checkpoint_final.safetensors").read_bytes() == before


def test_ema_warm_up():
    from fmkit.state import EMA

    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # after one step the EMA weights equal the raw weights
    assert torch.equal(ema.model.weight, model.weight)
    decays = []
    for _ in range(20000):
        decays.append(ema.current_decay())
        ema.updates += 1
    assert decays[0] == pytest.approx(1 / 11)  # update n uses n / (n + 10)
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False))
    assert decays[-1] == 0.999  # reaches the configured decay and stays there


def test_ema_warmup_option(tmp_path, faces, run_cli):
    from fmkit.state import EMA

    ema = EMA(torch.nn.Linear(2, 2), decay=0.99, warmup=30)
    ema.updates = 60
    assert ema.current_decay() == pytest.approx(60 / 90)
    assert EMA(torch.nn.Linear(2, 2), decay=0.99, warmup=0).current_decay() == 0.99  # no ramp

    # --ema-warmup 0: the first update already uses the target decay, so the EMA keeps
    # (1 - 0.5) of the initial weights; the default ramp copies the trained weights instead.
    for warmup in ("0", "10"):
        out = tmp_path / warmup
        args = train_args(faces, out, "--max-steps", 1, "--ema-decay", 0.5, "--ema-warmup", warmup)
        assert run_cli(*args).exit_code == 0
        tensors, meta = checkpoint.load(out / "checkpoint_final.safetensors")
        assert meta["config"]["ema_warmup"] == float(warmup)
        model = checkpoint.unpack_state("model", tensors)
        ema = checkpoint.unpack_state("ema", tensors)
        same = all(torch.equal(model[k], ema[k]) for k in model)
        assert same == (warmup == "10")


def test_resume_restores_the_ema_exactly(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    run_cli(*train_args(faces, out, "--max-steps", 3, "--ema-decay", 0.99))
    run_cli(*train_args(faces, out, "--max-steps", 5, "--ema-decay", 0.99, "--resume"))
    _, meta = checkpoint.load(out / "checkpoint_final.safetensors")
    assert meta["ema_updates"] == 5
    full = tmp_path / "full"
    run_cli(*train_args(faces, full, "--max-steps", 5, "--ema-decay", 0.99))
    a, b = (
        weights(out / "checkpoint_final.safetensors"),
        weights(full / "checkpoint_final.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("ema."))


def test_decoded_images_are_cached_once_and_match_the_files(tmp_path, faces, run_cli, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FMKIT_CACHE", str(cache))
    plain = [
        *train_args(faces, tmp_path / "plain", "--max-steps", 3),
        "--dataset-opt",
        "flip=false",
    ]
    assert run_cli(*plain, "--no-cache-dataset").exit_code == 0
    assert not cache.exists()  # turned off: nothing written
    first = [*train_args(faces, tmp_path / "a", "--max-steps", 3), "--dataset-opt", "flip=false"]
    assert run_cli(*first).exit_code == 0
    (written,) = (cache / "prepared").iterdir()
    assert written.name.startswith("folder-16px-") and (written / "images.npy").is_file()
    # The cached pixels are the decoded files' pixels: training is identical either way.
    a, b = (
        weights(tmp_path / "plain" / "checkpoint_final.safetensors"),
        weights(tmp_path / "a" / "checkpoint_final.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A later run reuses it; a changed image makes a new copy.
    stamp = (written / "images.npy").stat().st_mtime_ns
    assert run_cli(*train_args(faces, tmp_path / "b", "--max-steps", 1)).exit_code == 0
    assert [p.name for p in (cache / "prepared").iterdir()] == [written.name]
    assert (written / "images.npy").stat().st_mtime_ns == stamp
    write_image(faces / "00.png", size=(20, 20), color=(0, 255, 0))
    assert run_cli(*train_args(faces, tmp_path / "c", "--max-steps", 1)).exit_code == 0
    assert len(list((cache / "prepared").iterdir())) == 2

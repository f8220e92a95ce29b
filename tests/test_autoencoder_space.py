"""The `autoencoder` space: training on a diffusers autoencoder's latents. Small AutoencoderKL
and AutoencoderDC models are built from configs with random weights (no download); their cost
and shapes are real, only their quality is not."""

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, run_fmkit, small_faces, train_args
from PIL import Image

from fmkit.generator import Generator
from fmkit.space import build_space

diffusers = pytest.importorskip("diffusers")


def save_kl(folder):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae.save_pretrained(folder)
    return folder


def save_dc(folder):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(
        latent_channels=8,
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        attention_head_dim=8,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    return save_kl(tmp_path_factory.mktemp("vae") / "kl")


def encoder_calls(folder):
    """A counter of the encoder's forward passes of the autoencoder loaded from `folder`
    (fmkit loads each once per process, so this is the one training uses)."""
    from fmkit_plugins.autoencoder import _load

    vae, _ = _load(str(folder.resolve()), "float32")
    calls = []
    handle = vae.encoder.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls, handle


def test_encode_and_decode_shapes_dtypes_and_factors(kl, tmp_path):
    space = build_space("autoencoder", {"model": str(kl)})
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = space.encode(images)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32  # f2: one downsampling level
    assert space.shape(3, 16) == (4, 8) and not space.lossless and space.encoded_once
    vae = diffusers.AutoencoderKL.from_pretrained(kl)
    mode = vae.encode(images).latent_dist.mode()
    assert torch.allclose(z, (mode - 0.1) * 0.5, atol=1e-5)  # the config's shift and scale
    decoded = space.decode(z)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.float32
    assert torch.allclose(decoded, vae.decode(mode).sample.clamp(-1, 1), atol=1e-5)
    noise = space.noise(3, 3, 16, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 4, 8, 8)  # drawn in the latent shape, not encoded
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsampling factor 2"):
        space.shape(3, 15)

    dc = build_space("autoencoder", {"model": str(save_dc(tmp_path / "dc"))})
    assert dc.shape(3, 16) == (8, 4)  # AutoencoderDC: 1/4 with three levels here
    assert dc.encode(images).shape == (2, 8, 4, 4) and dc.decode(dc.encode(images)).shape == (
        2, 3, 16, 16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, kl):
    """A 4-step run on 8 images at 16x16 in the KL space, with the encoder's calls counted."""
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("latent")
    faces = small_faces(root / "faces")
    space = ["--space", "autoencoder", "--space-opt", f"model={kl}"]
    calls, handle = encoder_calls(kl)
    runs = []
    try:
        for name in ("run", "again"):
            args = train_args(faces, root / name, "--max-steps", 4, *space)
            result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            runs.append((result, list(calls)))
            calls.clear()
    finally:
        handle.remove()
    return {"root": root, "faces": faces, "space": space, "runs": runs}


def test_latents_are_encoded_once_with_their_mirror_images(latent_run, kl):
    (first, first_calls), (second, second_calls) = latent_run["runs"]
    assert "in the autoencoder space" in first.output
    assert sum(first_calls) == 16  # 8 images and their 8 mirror images, once
    assert second_calls == []  # the second run read the cache: the encoder never ran
    from fmkit.prepared import cache_root

    [folder] = (cache_root() / "encoded").glob("autoencoder-16px-*")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["count"] == 8 and meta["shape"] == [4, 8] and len(meta["stats"]["std"]) == 4
    latents = np.load(folder / "latents.npy")
    assert latents.shape == (8, 2, 4, 8, 8) and latents.dtype == np.float16
    space = build_space("autoencoder", {"model": str(kl)})
    images = torch.stack(
        [torch.tensor(np.asarray(Image.open(latent_run["faces"] / f"{i}.png"))) for i in range(8)]
    ).permute(0, 3, 1, 2).float() / 127.5 - 1  # fmt: skip
    stored = torch.from_numpy(latents).float()
    assert torch.allclose(stored[:, 0], space.encode(images), atol=2e-3)
    assert torch.allclose(stored[:, 1], space.encode(images.flip(-1)), atol=2e-3)
    # Why both are kept: a mirror image's latent is not the mirrored latent.
    assert not torch.allclose(stored[:, 1], stored[:, 0].flip(-1), atol=1e-2)
    std = torch.from_numpy(latents[:, 0]).float().transpose(0, 1).flatten(1).std(1, correction=0)
    assert torch.allclose(torch.tensor(meta["stats"]["std"]), std, rtol=1e-2)


def test_a_latent_model_samples_exports_and_serves_images(latent_run, tmp_path, run_cli, kl):
    run = latent_run["root"] / "run"
    generator = Generator.load(run)
    assert generator.spec.space == "autoencoder" and generator.spec.model_shape() == (4, 8)
    assert generator.spec.space_opts["model"] == str(kl.resolve())  # recorded absolute
    first = next(m for m in generator.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4  # the backbone was built for the latents
    samples = generator.sample(2, steps=2, trajectory=3)
    assert samples.images.shape == (2, 3, 16, 16)  # decoded
    assert samples.trajectory.shape == (3, 2, 3, 16, 16)
    out = tmp_path / "samples"
    result = run_cli("sample", "--checkpoint", run, "--num-samples", 2, "--output", out)
    assert result.exit_code == 0, result.output
    with Image.open(out / "00000.png") as image:
        assert image.size == (16, 16)
    with Image.open(run / "final_samples_grid.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)

    exported = tmp_path / "exported"
    assert run_cli("export", "--checkpoint", run, "--out", exported).exit_code == 0
    again = Generator.load(exported).sample(2, steps=2)
    assert torch.allclose(again.images, generator.sample(2, steps=2).images, atol=1e-5)
    line = one_line_error(run_cli("export", "--checkpoint", run, "--out", tmp_path / "o",
                                  "--format", "onnx"))  # fmt: skip
    assert "generates in the space 'autoencoder'" in line

    from fmkit.demo import Demo

    reply = Demo(Generator.load(exported)).generate({"seed": 1, "count": 2, "steps": 2})
    assert len(reply["images"]) == 2

    line = one_line_error(run_cli("reflow", "--teacher", run, "--out", tmp_path / "pairs",
                                  "--num-pairs", 4))  # fmt: skip
    assert "lossless space" in line


def test_resume_is_exact_in_latent_space(latent_run, tmp_path, run_cli):
    faces, space = latent_run["faces"], latent_run["space"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli(*train_args(faces, full, "--max-steps", 4, *space)).exit_code == 0
    assert run_cli(*train_args(faces, split, "--max-steps", 2, *space)).exit_code == 0
    assert run_cli(*train_args(faces, split, "--max-steps", 4, "--resume")).exit_code == 0
    from fmkit import checkpoint

    a, _ = checkpoint.load(full / "checkpoint_final.safetensors")
    b, _ = checkpoint.load(split / "checkpoint_final.safetensors")
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[key], b[key]), key


def test_a_missing_autoencoder_is_one_line_that_says_where_to_put_it(faces, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    args = train_args(faces, tmp_path / "run", "--max-steps", 1, "--space", "autoencoder")
    result = run_fmkit(*args, "--space-opt", "model=nobody/no-such-vae", env_extra=offline)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("Error: ")]
    assert f"nor in the Hugging Face cache ({tmp_path / 'hub'})" in line
    assert "hf download nobody/no-such-vae" in line
    result = run_fmkit(*args, "--space-opt", f"model={tmp_path / 'nothing'}", env_extra=offline)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Error: no autoencoder at" in result.stderr and "config.json" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_autoencoder_loads_from_a_pipeline_repo_in_the_hub_cache_offline(kl, faces, tmp_path):
    from test_hub import hub_cache

    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (pipeline / "vae" / name).write_bytes((kl / name).read_bytes())
    names = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")
    cache = hub_cache(tmp_path / "hf", "org/pipeline", pipeline, names)
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = tmp_path / "run"
    args = train_args(faces, run, "--max-steps", 1, "--space", "autoencoder",
                      "--space-opt", "model=org/pipeline")  # fmt: skip
    result = run_fmkit(*args, env_extra=offline)
    assert result.returncode == 0, result.stderr
    spec = json.loads((run / "config.json").read_text())
    assert spec["space_opts"] == {"model": "org/pipeline"}  # a Hub id is recorded as given


def test_a_class_conditional_model_trains_on_latents_with_its_labels(kl, tmp_path, run_cli):
    from test_conditional import colour_folder

    data = colour_folder(tmp_path / "colours", per_class=4, size=16)
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", data, "--condition", "class",
            "--image-size", 16, "--batch-size", 4, "--max-steps", 2, "--num-samples", 4,
            "--sample-steps", 2, "--output", run, "--space", "autoencoder",
            "--space-opt", f"model={kl}", "--backbone-opt", "base_channels=8",
            "--backbone-opt", "channel_mult=1,2", "--backbone-opt", "attn_resolutions=4"]  # fmt: skip
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    from fmkit.encoded import EncodedArray
    from fmkit.prepared import cache_root

    [folder] = [f for f in (cache_root() / "encoded").glob("autoencoder-16px-*")
                if (f / "labels.npy").is_file()]  # fmt: skip
    batch = EncodedArray(folder, condition="class").__getitems__([0, 7, 3])
    assert batch.cond["class"].tolist() == [0, 1, 0]  # blue (sorted first), red, blue
    assert batch.images.shape == (3, 4, 8, 8) and batch.mirror.shape == (3, 4, 8, 8)
    generator = Generator.load(run)
    assert generator.sample(2, cond={"class": "red"}, steps=2).images.shape == (2, 3, 16, 16)

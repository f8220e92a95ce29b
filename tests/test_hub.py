"""Models on the Hugging Face Hub: `--checkpoint org/name` and `Generator.from_pretrained`
read a model folder from the Hub's cache, laid out here as huggingface_hub lays it out (blobs,
snapshots of symlinks, refs), with the network off."""

import hashlib
import os
import sys

import pytest
from conftest import run_fmkit, small_faces, train_args

pytest.importorskip("huggingface_hub", reason="the hub extra is not installed")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo, folder, names=("config.json", "model.safetensors")):
    """`folder`'s files `names` as huggingface_hub caches a snapshot of `repo` at COMMIT in
    `root`."""
    cached = root / f"models--{repo.replace('/', '--')}"
    (cached / "blobs").mkdir(parents=True)
    snapshot = cached / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in names:
        data = (folder / name).read_bytes()
        blob = cached / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from click.testing import CliRunner

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("hub")
    faces = small_faces(root / "faces")
    run, folder = root / "run", root / "model"
    for args in (
        train_args(faces, run, "--max-steps", 2),
        ["export", "--checkpoint", run, "--format", "fmkit", "--out", folder],
    ):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return hub_cache(root / "hf", "fmkit-org/faces", folder)


def offline(cache):
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_sample_from_a_hub_repo_id_reads_the_cache_offline(cache, tmp_path):
    out = tmp_path / "samples"
    result = run_fmkit("sample", "--checkpoint", "fmkit-org/faces", "--num-samples", 2,
                       "--output", out, env_extra=offline(cache))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "grid.png").is_file() and "mean NFE" in result.stdout
    # A revision is a branch, tag or commit.
    pinned = run_fmkit("sample", "--checkpoint", f"fmkit-org/faces@{COMMIT}", "--num-samples", 1,
                       "--output", tmp_path / "pinned", env_extra=offline(cache))  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr


def test_from_pretrained_takes_a_repo_id(cache):
    import subprocess

    code = (
        "from fmkit import Generator; g = Generator.from_pretrained('fmkit-org/faces'); "
        "print(g.sample(2, seed=0).images.shape)"
    )
    env = {**os.environ, **offline(cache)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.Size([2, 3, 16, 16])"


def test_a_repo_neither_here_nor_reachable_is_one_line(cache, tmp_path):
    result = run_fmkit("sample", "--checkpoint", "fmkit-org/other", "--output", tmp_path / "s",
                       env_extra=offline(cache))  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: fmkit-org/other is not a local path, nor in the Hugging Face cache ({cache}), "
        "and the Hub cannot be reached (offline?): fetch it into that cache where there is a "
        "network (hf download fmkit-org/other) or give a local folder"
    ]
    # Not shaped like a repo id: the local path that does not exist.
    missing = run_fmkit("sample", "--checkpoint", tmp_path / "nope", env_extra=offline(cache))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_without_huggingface_hub_a_repo_id_says_what_to_install(cache, tmp_path):
    shadow = tmp_path / "shadow" / "huggingface_hub"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**offline(cache), "PYTHONPATH": str(shadow.parent)}
    result = run_fmkit("sample", "--checkpoint", "fmkit-org/faces", env_extra=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: fmkit-org/faces is not a local path; to read it from the Hugging Face Hub, "
        "install huggingface_hub: pip install 'fmkit[hub]'"
    ]

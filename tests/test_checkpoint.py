"""Checkpoint files: every valid safetensors header is recognised, run directories are scanned
by header only, unreadable runs are never restarted over, and files honour the umask."""

import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, train_args

from fmkit import checkpoint


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_every_header_length_loads(tmp_path):
    # safetensors pads its header to a multiple of 8, so 32 residues mod 256 can occur; the
    # ones with a first byte of 0x80 used to be refused as pickles.
    residues = {}
    for pad in range(400):
        path = tmp_path / f"checkpoint_step_{pad}.safetensors"
        checkpoint.save(path, {"w": torch.full((3,), float(pad))}, {"step": pad, "pad": "x" * pad})
        residues.setdefault(header_length(path) % 256, path)
    assert sorted(residues) == list(range(0, 256, 8))
    for residue, path in residues.items():
        tensors, meta = checkpoint.load(path)
        assert tensors["w"][0].item() == meta["step"], residue
    assert checkpoint.find_latest(tmp_path).name == "checkpoint_step_399.safetensors"


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_find_latest_reads_headers_only(tmp_path):
    big = {"w": torch.zeros(4 * 2**20)}  # 16 MiB of tensor data per file
    for step in (1, 2, 3):
        checkpoint.save(tmp_path / f"checkpoint_step_{step}.safetensors", big, {"step": step})
    before = _bytes_read()
    latest = checkpoint.find_latest(tmp_path)
    assert latest.name == "checkpoint_step_3.safetensors"
    assert _bytes_read() - before < 2**20  # far less than one file's 16 MiB


def test_a_truncated_checkpoint_is_never_called_a_pickle(tmp_path):
    path = tmp_path / "c.safetensors"
    for pad in range(256):  # a header whose first byte is 0x80, like a pickle's
        checkpoint.save(path, {"w": torch.ones(64)}, {"step": 1, "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(checkpoint.FmkitError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_a_truncated_newer_checkpoint_does_not_hide_a_good_one(tmp_path):
    checkpoint.save(tmp_path / "checkpoint_step_1.safetensors", {"w": torch.ones(64)}, {"step": 1})
    newer = tmp_path / "checkpoint_step_2.safetensors"
    checkpoint.save(newer, {"w": torch.ones(64)}, {"step": 2})
    newer.write_bytes(newer.read_bytes()[:-10])  # header intact, data cut short
    assert checkpoint.find_latest(tmp_path).name == "checkpoint_step_1.safetensors"
    with pytest.raises(checkpoint.FmkitError, match="corrupt or truncated"):
        checkpoint.load(newer)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_checkpoints_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = checkpoint.save(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {"step": 0})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_resume_from_a_checkpoint_whose_header_starts_with_0x80(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    assert run_cli(*train_args(faces, out, "--max-steps", 2)).exit_code == 0
    final = out / "checkpoint_final.safetensors"
    tensors, meta = checkpoint.load(final)
    # Re-save the same checkpoint with metadata padded until its header length is 128 mod 256
    # (first byte 0x80, as a pickle's): the only checkpoint of the run.
    for pad in range(256):
        checkpoint.save(final, tensors, {**meta, "pad": "x" * pad})
        if final.read_bytes()[0] == 0x80:
            break
    assert final.read_bytes()[0] == 0x80
    result = run_cli(*train_args(faces, out, "--max-steps", 3, "--resume"))
    assert result.exit_code == 0, result.output
    assert f"resumed from {final} at step 2" in result.output


def test_resume_over_only_unreadable_checkpoints_stops_and_keeps_them(tmp_path, faces, run_cli):
    out = tmp_path / "run"
    out.mkdir()
    pickled = out / "checkpoint_step_5.safetensors"
    torch.save({"w": torch.ones(2)}, pickled)
    cut = out / "checkpoint_step_9.safetensors"
    checkpoint.save(cut, {"w": torch.ones(64)}, {"step": 9})
    cut.write_bytes(cut.read_bytes()[:-5])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (pickled, cut)}
    line = one_line_error(run_cli(*train_args(faces, out, "--max-steps", 2, "--resume")))
    assert "no readable checkpoint" in line
    assert "checkpoint_step_5.safetensors (a pickle/torch.save file)" in line
    assert "checkpoint_step_9.safetensors (corrupt or truncated)" in line
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (pickled, cut)} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in before)


def test_optimizer_moments_get_their_parameters_layout_back():
    # Fused AdamW on CUDA needs moments with the strides of channels_last parameters; a
    # checkpoint stores them contiguous. (Found on an H200: resuming crashed.)
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    conv(torch.randn(2, 4, 8, 8)).square().mean().backward()
    opt.step()
    tensors, groups = checkpoint.optimizer_tensors(opt)
    stored = {k: v.contiguous() for k, v in tensors.items()}  # as a checkpoint holds them
    restored = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    checkpoint.load_optimizer(restored, stored, groups)
    weight = conv.weight
    assert not weight.is_contiguous()
    for name in ("exp_avg", "exp_avg_sq"):
        moment = restored.state[weight][name]
        assert moment.stride() == weight.stride(), name
        assert torch.equal(moment, opt.state[weight][name])

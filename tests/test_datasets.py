"""folder, prepared and imagenet (WebDataset) datasets on data the tests write."""

import io
import logging
import pickle

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_image
from PIL import Image

from fmkit import FmkitError
from fmkit.augment import hflip
from fmkit.batch import Batch
from fmkit.data import build_dataset, make_loader
from fmkit.objective import Draws


def make_folder(root):
    write_image(root / "a.jpg", color=(255, 0, 0))
    write_image(root / "nested" / "deeper" / "b.png", color=(0, 255, 0), mode="RGBA")
    write_image(root / "nested" / "c.bmp", color=(0, 0, 255), mode="L")
    write_image(root / "d.webp", color=(10, 20, 30), mode="P", fmt="WEBP")
    write_image(root / "e.PNG", size=(40, 8), color=(5, 5, 5))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_finds_nested_images_and_converts_modes(tmp_path):
    root = make_folder(tmp_path / "faces")
    data = build_dataset("folder", str(root), 8)
    assert len(data) == 5
    images = [data[i] for i in range(len(data))]
    for image in images:
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    red = images[0]  # sorted order: a.jpg first
    assert red[0].mean() > 0.9 and red[1].mean() < -0.8


def test_folder_skips_corrupt_and_truncated_files_with_one_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "faces")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (root / "nested" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with caplog.at_level(logging.WARNING, logger="fmkit"):
        data = build_dataset("folder", str(root), 8)
    assert len(data) == 5
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipping 2 unreadable" in message and "corrupt.jpg" in message
    assert "truncated.jpg" in message


def test_empty_and_missing_folders_are_clear_errors(tmp_path, run_cli):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FmkitError, match="no images in .*empty"):
        build_dataset("folder", str(tmp_path / "empty"), 8)
    result = run_cli("prepare", "folder", "--data-dir", tmp_path / "nope", "--out", tmp_path / "o")
    assert "does not exist" in one_line_error(result)


def test_flip_mirrors_about_half_the_items(tmp_path):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :8] = 255  # left half white
    Image.fromarray(image).save(tmp_path / "half.png")
    data = build_dataset("folder", str(tmp_path), 16)
    # Flips are the training loop's: drawn per sample of the global batch from the step's seed.
    batch = Batch(data[0].expand(200, 3, 16, 16).clone())
    flipped = hflip(batch, Draws(0, 0, 200, slice(0, 200), stream="augment")).images
    lefts = [image[:, :, :8].mean().item() > 0 for image in flipped]
    assert 60 < sum(lefts) < 140
    # Two processes (or micro-batches) of 100 flip exactly the images one process of 200 does.
    halves = [
        hflip(batch.rows(lo, lo + 100), Draws(0, 0, 200, slice(lo, lo + 100), stream="augment"))
        for lo in (0, 100)
    ]
    assert torch.equal(torch.cat([h.images for h in halves]), flipped)


def test_prepare_then_prepared_dataset_gives_the_same_pixels(tmp_path, run_cli):
    root = make_folder(tmp_path / "faces")
    out = tmp_path / "cache"
    result = run_cli("prepare", "folder", "--data-dir", root, "--image-size", 8, "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 5 images of 8x8" in result.output
    assert not (tmp_path / "cache.partial").exists()
    direct = build_dataset("folder", str(root), 8)
    cached = build_dataset("prepared", str(out), 8)
    assert len(cached) == 5
    for i in range(5):
        torch.testing.assert_close(cached[i], direct[i], rtol=0, atol=1e-6)
    batch = next(iter(make_loader(cached, batch_size=4)))
    assert batch.shape == (4, 3, 8, 8)
    with pytest.raises(FmkitError, match="prepared at 8x8, not 16x16"):
        build_dataset("prepared", str(out), 16)
    with pytest.raises(FmkitError, match="is not a prepared dataset"):
        build_dataset("prepared", str(root), 8)


class Evil:
    """Unpickling this would create a file: proof that a field was decoded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_shards(root, n_shards=4, per_shard=5, evil_path=None):
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for _ in range(per_shard):
                jpg = io.BytesIO()
                Image.new("RGB", (12, 10), (index * 5 % 255, 0, 0)).save(jpg, format="JPEG")
                sample = {"__key__": f"{index:06d}", "jpg": jpg.getvalue(), "cls": index}
                if evil_path is not None:
                    sample["pyd"] = pickle.dumps(Evil(evil_path))
                sink.write(sample)
                index += 1
    return root


def labels_seen(data, num_workers):
    loader = make_loader(data, batch_size=1, num_workers=num_workers, drop_last=False)
    return [int(label) for _, labels in loader for label in labels]


def test_webdataset_two_ranks_two_workers_see_every_sample_once(tmp_path, monkeypatch):
    evil = tmp_path / "pwned"
    shards = write_shards(tmp_path / "shards", evil_path=evil)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = build_dataset(
            "imagenet",
            str(shards),
            8,
            options={"num_classes": 20, "shuffle_buffer": 4},
            condition="class",
        )
        seen += labels_seen(data, num_workers=2)
    assert sorted(seen) == list(range(20))
    assert not evil.exists()  # the pickle field was never decoded


def test_webdataset_brace_pattern_and_resampled_epochs(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "shards")
    monkeypatch.delenv("RANK", raising=False)
    pattern = str(shards / "train-{000000..000003}.tar")
    data = build_dataset(
        "imagenet", pattern, 8, options={"num_classes": 20, "shuffle_buffer": 0}, condition="class"
    )
    assert sorted(labels_seen(data, 0)) == list(range(20))
    resampled = build_dataset(
        "imagenet", str(shards), 8, options={"resampled": True, "epoch_length": 12}
    )
    batches = list(make_loader(resampled, batch_size=3, num_workers=2, drop_last=False))
    assert sum(len(b) for b in batches) == 12
    with pytest.raises(FmkitError, match="needs epoch_length"):
        build_dataset("imagenet", str(shards), 8, options={"resampled": True})


def test_prepare_imagenet_copies_jpeg_bytes_into_shuffled_shards(tmp_path, run_cli):
    import tarfile

    src = tmp_path / "ILSVRC" / "train"
    originals = {}
    for c, name in enumerate(["n01440764", "n01443537", "n01484850"]):
        for i in range(4):
            path = write_image(src / name / f"{name}_{i}.JPEG", color=(c * 80, i * 60, 0))
            originals[path.read_bytes()] = c
    out = tmp_path / "shards"
    result = run_cli("prepare", "imagenet", "--src", src, "--out", out, "--per-shard", 5)
    assert result.exit_code == 0, result.output
    assert "wrote 12 samples of 3 classes" in result.output
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) == 3
    payloads, classes = [], []
    for tar in tars:
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                data = t.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    payloads.append(data)
                elif member.name.endswith(".cls"):
                    classes.append(int(data))
    assert sorted(payloads) == sorted(originals)  # bytes copied, not re-encoded
    assert [originals[p] for p in payloads] == classes
    assert classes != sorted(classes)  # shuffled, not class by class
    data = build_dataset("imagenet", str(out), 8, condition="class")
    assert sorted(label for _, label in data) == sorted(classes)
    assert data.describe().condition.names == ("n01440764", "n01443537", "n01484850")


def test_webdataset_workers_see_each_epochs_shuffle(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "shards")
    monkeypatch.delenv("RANK", raising=False)
    data = build_dataset("imagenet", str(shards), 8, options={"num_classes": 20}, condition="class")
    loader = make_loader(data, batch_size=1, num_workers=2, drop_last=False)
    orders = []
    for epoch in range(2):
        data.set_epoch(epoch)
        orders.append([int(label) for _, labels in loader for label in labels])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20))
    assert orders[0] != orders[1]  # workers saw the new epoch's seed


def test_old_dataset_options_outside_training(tmp_path, run_cli):
    root = make_folder(tmp_path / "faces")
    out = tmp_path / "prepared"
    result = run_cli("prepare", "folder", "--data-dir", root, "--image-size", 8, "--out", out,
                     "--dataset-opt", "flip=false")  # fmt: skip
    assert result.exit_code == 0, result.output
    line = one_line_error(run_cli("prepare", "folder", "--data-dir", root, "--out", out,
                                  "--dataset-opt", "labels=true"))  # fmt: skip
    assert "labels is now --condition" in line

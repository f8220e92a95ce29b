"""Reflow's noise-image pairs (Liu et al. 2023, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow"): a teacher's ODE maps noise to images, and a model
trained on those fixed pairs (the `reflow` objective) learns straighter paths that few steps
can follow. Repeating it (a pair folder from a reflowed model) gives 3-rectified flow.

A pair folder is a prepared array (see fmkit.prepared) that any fmkit dataset reader can
open, plus the seed of each image's noise instead of the noise itself (the noise is 64x larger
than the uint8 image and regenerates exactly from its seed):

    images.npy       (N, S, S, C) uint8, the teacher's images
    noise_seeds.npy  (N,) int64; `pair_noise` turns them back into the noise
    labels.npy       (N, ...) the conditions asked for, balanced over the teacher's condition
                     kind's states (a class-conditional teacher: each class in turn)
    pairs.json       the settings and how many pairs are done (updated after every batch)
    meta.json        written last: the folder is complete and reads as a prepared dataset
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fmkit.conditions import condition_kind
from fmkit.errors import FmkitError
from fmkit.folders import Claim, FolderKind, claim, json_file, write_json
from fmkit.generator import Generator
from fmkit.pixels import to_uint8
from fmkit.prepared import META, pair_noise
from fmkit.progress import SamplingBar

PAIRS = "pairs.json"


def pair_seeds(seed: int, start: int, stop: int) -> Tensor:
    """(stop - start,) int64 noise seeds of pairs start..stop-1 of a folder made with `seed`."""
    seeds = []
    for i in range(start, stop):
        digest = hashlib.blake2b(f"fmkit-reflow:{seed}:{i}".encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") >> 1)  # non-negative int64
    return torch.tensor(seeds, dtype=torch.int64)


def write_pairs(
    teacher: Generator,
    out: Path,
    num_pairs: int,
    solver,
    settings: dict,
    batch_size: int = 256,
    seed: int = 0,
    guidance: float | None = None,
    interval: tuple[float, float] | None = None,
    progress: bool = True,
) -> Path:
    """Generate `num_pairs` noise-image pairs with `teacher` into `out`, resuming an
    interrupted folder made with the same settings.

    Args:
        settings: what identifies the pairs besides the arguments (the solver spec; the
            teacher's path and step are recorded as information): a folder made with other
            settings is never extended. The teacher's weights are identified by their digest
            (`Generator.weights_digest`), so a teacher that changed at the same path (a resumed
            run's newer final checkpoint) cannot extend its old pairs.
        batch_size: pairs per solve (adaptive solvers pick steps per batch, so the batch size
            is part of the settings too).
    """
    spec = teacher.data
    if not teacher.space.lossless:
        # The pairs are stored as images with the seed of image-shaped noise; in a lossy space
        # (latents) a pair would have to be stored as latent noise and latent, which is open.
        raise FmkitError(
            f"reflow pairs need a teacher trained in a lossless space (pixels, patchify); "
            f"this one trained in '{teacher.spec.space}'"
        )
    condition = spec.condition
    states = None  # the conditions the pairs are balanced over
    if condition.kind != "none":
        states = condition_kind(condition.kind).states(condition)
        if states is None:
            raise FmkitError(
                f"reflow pairs from a {condition.kind}-conditional teacher are not supported "
                "yet (which conditions to ask for is open: the kind has no few states to "
                "balance over); use a class-conditional or unconditional teacher"
            )
    out = Path(out)
    record = {
        **settings,
        "teacher_weights": teacher.weights_digest(),
        "num_pairs": num_pairs,
        "batch_size": batch_size,
        "seed": seed,
        "image_size": spec.image_size,
        "channels": spec.channels,
        "condition": condition.to_dict(),
    }
    guidance = teacher.defaults.guidance if guidance is None else guidance
    interval = teacher.defaults.guidance_interval if interval is None else interval
    if states is not None:  # guidance means something only for a conditional teacher
        record.update(guidance=guidance, guidance_interval=list(interval))
    folder, done = _start(out, record)
    if done is None:
        return out
    folder.add(PAIRS, "images.npy", "noise_seeds.npy", "labels.npy", META)
    if not (out / PAIRS).is_file():  # first: a folder stopped at any later point resumes
        write_json(out / PAIRS, {**record, "done": 0})
    shape = (spec.image_size, spec.image_size, spec.channels)
    mode = "r+" if (out / "images.npy").is_file() else "w+"
    try:
        images = np.lib.format.open_memmap(
            out / "images.npy", mode=mode, dtype=np.uint8, shape=(num_pairs, *shape)
        )
    except (OSError, ValueError):
        images = None
    if images is None or images.shape != (num_pairs, *shape):
        raise FmkitError(f"{out / 'images.npy'} is damaged; choose another --out")
    np.save(out / "noise_seeds.npy", pair_seeds(seed, 0, num_pairs).numpy())
    labels = None
    if states is not None:  # balanced over the kind's states (a class: each in turn)
        labels = states[torch.arange(num_pairs) % len(states)].numpy()
        np.save(out / "labels.npy", labels)
    with SamplingBar(num_pairs, "reflow pairs", "pair", done, enabled=progress) as bar:
        while done < num_pairs:
            stop = min(done + batch_size, num_pairs)
            noise = pair_noise(pair_seeds(seed, done, stop), (spec.channels, *shape[:2]))
            cond = None
            if labels is not None:
                cond = {condition.kind: torch.from_numpy(labels[done:stop]).to(teacher.device)}
            # The pair's noise stays image-shaped (what a lossless space encodes like its image).
            x = teacher.generate(
                teacher.space.encode(noise),
                solver,
                cond,
                guidance=guidance,
                interval=interval,
                watch=bar.watch,
            ).x
            x = teacher.space.decode(x)
            images[done:stop] = to_uint8(x.cpu()).permute(0, 2, 3, 1).numpy()
            images.flush()  # the pixels are on disk before the count that covers them
            bar.update(stop - done)
            done = stop
            write_json(out / PAIRS, {**record, "done": done})
    del images
    meta = {
        "count": num_pairs,
        "image_size": spec.image_size,
        "source": {"dataset": "reflow", **settings, "seed": seed},
    }
    if labels is not None:
        meta["condition"] = condition.to_dict()
    write_json(out / META, meta)
    return out


# Settings recorded for information only: a teacher folder may move, its weights may not.
INFORMATION = ("teacher", "teacher_step")


def _start(out: Path, record: dict) -> tuple[Claim, int | None]:
    """The folder and the pairs already done in it (0 for a new folder), or None when it is
    complete; a folder made with other settings or another teacher's weights is an error."""
    folder = claim(out, PAIR_FOLDER)
    if not (out / PAIRS).is_file():
        return folder, 0
    try:
        previous = json.loads((out / PAIRS).read_text())
    except (OSError, ValueError):
        raise FmkitError(f"{out / PAIRS} is unreadable; choose another --out") from None
    if "teacher_weights" not in previous and (out / META).is_file():
        return folder, None  # complete, from an older fmkit: nothing to add to it
    if "teacher_weights" not in previous:
        raise FmkitError(
            f"{out} records its teacher by path only (an older fmkit wrote it), so these "
            "weights cannot be checked against it; choose another --out"
        )
    changed = sorted(k for k in record if k not in INFORMATION and previous.get(k) != record[k])
    if "teacher_weights" in changed:
        raise FmkitError(
            f"{out} holds pairs of other teacher weights than {record.get('teacher', 'these')} "
            f"(step {previous.get('teacher_step')} then, {record.get('teacher_step')} now); "
            "choose another --out to make new pairs"
        )
    if changed:
        key = changed[0]
        raise FmkitError(
            f"{out} holds pairs made with {key}={previous.get(key)!r}, not {record[key]!r}; "
            "choose another --out to make new pairs"
        )
    if (out / META).is_file():
        return folder, None
    return folder, int(previous.get("done", 0))


# A pair folder; those written before folders were marked are recognised by pairs.json.
PAIR_FOLDER = FolderKind(
    "pairs",
    "reflow pairs",
    "fmkit reflow",
    signature=(PAIRS,),
    allowed=(PAIRS, ".pairs.json.*", "pairs.json.tmp", "images.npy", "noise_seeds.npy",
             "labels.npy", META),
    recognise=json_file(PAIRS, ("num_pairs", "seed")),
)  # fmt: skip

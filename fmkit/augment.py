"""Training augmentation, drawn per sample from the step's seed (so one process and eight, or a
resumed run, flip alike)."""

from __future__ import annotations

import torch

from fmkit.batch import Batch
from fmkit.objective import Draws


def hflip(batch: Batch, draws: Draws) -> Batch:
    """Mirror each image with probability 1/2, drawn per sample from the step's seed. Paired
    noise is mirrored with its image: for a teacher trained with flips, the mirrored noise
    leads to the mirrored image. A batch read from an encoded cache carries each image's
    encoded mirror image (`Batch.mirror`), which is taken instead of flipping the encoding."""
    flips = draws.uniform()[:, None, None, None] < 0.5  # (n, 1, 1, 1)
    if batch.mirror is not None:
        images = torch.where(flips, batch.mirror, batch.images)
        return Batch(images, batch.cond, batch.noise)
    return batch.map(lambda v: torch.where(flips, v.flip(-1), v), lambda v: v)

"""What travels from a dataset to a model: the data's description, its conditions, and batches.

Conditions have one form everywhere (datasets, batches, objectives, backbones, checkpoints):
`cond` is None for unconditional data, else a dict of tensors, each with the batch first:

    cond[KIND]  the values of the data's condition kind (fmkit.conditions; the built-in kinds
                are in fmkit_plugins.conditions), e.g. one class index or K attribute states
                per sample
    cond["r"]   (B,) float, a second time for few-step objectives (set by the objective)

A condition left out (dropped in training, so one model also serves unconditionally, or not
asked for at sampling time) holds its kind's "unspecified" values: UNSPECIFIED, -1, for the
built-in kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

UNSPECIFIED = -1

Cond = dict[str, Tensor]  # see the module docstring


@dataclass(frozen=True)
class Condition:
    """What a dataset's items are conditioned on.

    Attributes:
        kind: "none" (unconditional), or a registered condition kind (`fmkit list
            conditions`), such as one of K classes or K binary attributes.
        names: the K names the kind is about, in index order.
    """

    kind: str = "none"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"a condition kind is a name, got {self.kind!r}")
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))

    @property
    def size(self) -> int:
        """K: the number of names (0 when unconditional)."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Condition:
        data = data or {}
        return cls(data.get("kind", "none"), tuple(data.get("names", ())))


@dataclass(frozen=True)
class DataSpec:
    """What a dataset yields, and so what a backbone is built for.

    Attributes:
        channels: image channels C.
        image_size: side S of the square (C, S, S) images.
        condition: the conditions items carry.
    """

    channels: int
    image_size: int
    condition: Condition = field(default_factory=Condition)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "image_size": self.image_size,
            "condition": self.condition.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        return cls(
            int(data["channels"]),
            int(data["image_size"]),
            Condition.from_dict(data.get("condition")),
        )


def describe(dataset, image_size: int, channels: int = 3) -> DataSpec:
    """The dataset's own description (its `describe()`), else unconditional images."""
    if callable(getattr(dataset, "describe", None)):
        return dataset.describe()
    return DataSpec(channels, image_size)


@dataclass
class Batch:
    """Images and their conditions.

    Attributes:
        images: (B, C, H, W) float in [-1, 1].
        cond: None, or the condition dict described in this module's docstring.
        noise: None, or (B, C, H, W) the noise each image is paired with (reflow's pairs);
            objectives that draw their own noise ignore it.
        mirror: None, or (B, C, H, W) the encoding of each image's mirror image, read from
            an encoded cache (fmkit.encoded): in a lossy space the encoding of a flipped
            image is not the flipped encoding, so augmentation picks this instead.
    """

    images: Tensor
    cond: Cond | None = None
    noise: Tensor | None = None
    mirror: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def map(self, images, values) -> Batch:
        """A Batch with `images(t)` applied to the image-shaped tensors (images, noise,
        mirror) and `values(t)` to the conditions."""
        noise = None if self.noise is None else images(self.noise)
        mirror = None if self.mirror is None else images(self.mirror)
        return Batch(images(self.images), _map(self.cond, values), noise, mirror)

    def to(self, device: torch.device, memory_format=torch.contiguous_format) -> Batch:
        def move(v: Tensor) -> Tensor:
            return v.to(device, non_blocking=True).contiguous(memory_format=memory_format)

        return self.map(move, lambda v: v.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return self.map(Tensor.pin_memory, Tensor.pin_memory)

    def rows(self, start: int, stop: int) -> Batch:
        """Items start..stop-1."""
        return self.map(lambda v: v[start:stop], lambda v: v[start:stop])


def _map(cond: Cond | None, fn) -> Cond | None:
    return None if cond is None else {k: fn(v) for k, v in cond.items()}


def call_model(model, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
    """The velocity of a backbone: `model(x, t)` when there is no condition, else
    `model(x, t, cond)`, so an unconditional backbone never needs a third argument."""
    return model(x, t) if cond is None else model(x, t, cond)

"""The built-in spaces: pixels (the identity) and patchify (space-to-depth)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from fmkit import hookimpl
from fmkit.space import Space


class Pixels(Space):
    """Images as they are: what fmkit has always trained on."""

    lossless = True
    images = True

    def shape(self, channels: int, image_size: int) -> tuple[int, int]:
        return channels, image_size

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, x: Tensor) -> Tensor:
        return x


class Patchify(Space):
    """Each f x f patch of pixels folded into the channels (space-to-depth, as
    `torch.nn.functional.pixel_unshuffle`): (B, C, S, S) -> (B, C f^2, S/f, S/f). Lossless; a
    backbone does its work at 1/f^2 of the positions, like a latent model's grid, without an
    autoencoder. (Pixel-space diffusion models such as Simple Diffusion patchify their input
    the same way; Hoogeboom et al. 2023.)

    Args:
        factor: f, 2 or 4; the image size must be a multiple of it.
    """

    lossless = True

    def __init__(self, factor: int) -> None:
        if factor not in (2, 4):
            raise ValueError(f"factor must be 2 or 4, got {factor}")
        self.factor = factor

    def shape(self, channels: int, image_size: int) -> tuple[int, int]:
        if image_size % self.factor:
            raise ValueError(
                f"--image-size {image_size} is not a multiple of the patch factor {self.factor}"
            )
        return channels * self.factor**2, image_size // self.factor

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(x, self.factor)


def pixels() -> Pixels:
    """Pixels: the model generates images directly (the default)."""
    return Pixels()


def patchify(*, factor: Literal[2, 4] = 2) -> Patchify:
    """Space-to-depth by `factor` (2 or 4): lossless, the backbone runs at 1/factor^2 of the
    positions with factor^2 times the channels."""
    return Patchify(factor)


@hookimpl
def register_spaces(register):
    register("pixels", pixels)
    register("patchify", patchify)

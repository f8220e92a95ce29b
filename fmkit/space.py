"""Where a model generates: a space maps images to what the backbone sees and its samples back
to images. `pixels` is the identity; `patchify` folds each f x f patch into channels (a UNet
then works at 1/f^2 of the positions with f^2 times the channels); a plugin adds others through
the hook `register_spaces`. Datasets stay image datasets: the training loop encodes each batch,
and every command that makes images decodes what the model generated."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Space(ABC):
    """An image representation a model can be trained in.

    Noise is drawn in image shape and encoded like an image, so a lossless space (a
    permutation of the pixels) turns Gaussian noise into Gaussian noise and a pair of noise
    and image (reflow) or a flip stays a pair after encoding.
    """

    #: decode(encode(x)) == x exactly and encode only moves pixels: likelihoods in the space
    #: are the images' likelihoods (fmkit eval nll) and noise maps to noise.
    lossless: bool = False
    #: what the backbone generates is the image itself (decode is the identity), so formats
    #: whose readers expect images straight from the network (onnx, diffusers) can hold it.
    images: bool = False

    @abstractmethod
    def shape(self, channels: int, image_size: int) -> tuple[int, int]:
        """(channels, side) of what the backbone sees for (channels, image_size, image_size)
        images; ValueError saying why when the space cannot take that size."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """(B, C, S, S) images in [-1, 1] -> (B, c, s, s) as `shape` says."""

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """(B, c, s, s) -> (B, C, S, S) images in about [-1, 1]."""


def build_space(name: str, options: dict | None = None) -> Space:
    """The registered space `name` with its options (an unknown name lists the known ones)."""
    from fmkit.plugins import registry

    return registry("spaces").build(name, options or {})

"""Where a model generates: a space maps images to what the backbone sees and its samples back
to images. `pixels` is the identity; `patchify` folds each f x f patch into channels (a UNet
then works at 1/f^2 of the positions with f^2 times the channels); a plugin adds others through
the hook `register_spaces` (the built-in `autoencoder` trains on a pretrained autoencoder's
latents). Datasets stay image datasets: the training loop encodes each batch, or, for a space
whose encoder is costly (`encoded_once`), reads each image's encoding from fmkit's encoded cache
(fmkit.encoded); every command that makes images decodes what the model generated."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Space(ABC):
    """An image representation a model can be trained in.

    In a lossless space noise is drawn in image shape and encoded like an image (a permutation
    of the pixels turns Gaussian noise into Gaussian noise), so a pair of noise and image
    (reflow) or a flip stays a pair after encoding. A lossy space draws its noise in its own
    shape (`noise`).
    """

    #: decode(encode(x)) == x exactly and encode only moves pixels: likelihoods in the space
    #: are the images' likelihoods (fmkit eval nll) and noise maps to noise.
    lossless: bool = False
    #: what the backbone generates is the image itself (decode is the identity), so formats
    #: whose readers expect images straight from the network (onnx, diffusers) can hold it.
    images: bool = False
    #: encoding is costly and depends only on the image (a pretrained encoder): training
    #: encodes each image and its mirror image once into fmkit's encoded cache, keyed by
    #: `fingerprint()`, and never runs the encoder again (fmkit.encoded).
    encoded_once: bool = False

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

    def noise(self, n: int, channels: int, image_size: int, generator: torch.Generator) -> Tensor:
        """(n, c, s, s) standard normal noise in this space, drawn on the CPU from `generator`:
        image-shaped noise encoded (right for lossless spaces); lossy spaces draw in their own
        shape."""
        return self.encode(torch.randn(n, channels, image_size, image_size, generator=generator))

    def fingerprint(self) -> str:
        """What `encode` depends on besides the image (weights, scaling), as a short string:
        part of the encoded cache's key, for spaces that are `encoded_once`."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its encoder")

    def record(self, options: dict) -> dict:
        """The options to save with a model trained in this space, from those it was built
        with (e.g. a local path made absolute, so the model loads from anywhere)."""
        return options


def build_space(name: str, options: dict | None = None) -> Space:
    """The registered space `name` with its options (an unknown name lists the known ones)."""
    from fmkit.plugins import registry

    return registry("spaces").build(name, options or {})

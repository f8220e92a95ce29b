"""The `autoencoder` space: train on the latents of a pretrained diffusers autoencoder
(AutoencoderKL: SD-VAE, 4 channels at 1/8 of the side, or FLUX-style 16 channels;
AutoencoderDC: 1/32), loaded from a local folder or the Hugging Face cache."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from fmkit import hookimpl
from fmkit.errors import FmkitError
from fmkit.hub import is_repo_id, locate
from fmkit.space import Space

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
KINDS = ("AutoencoderKL", "AutoencoderDC")
# What a Hub download fetches: an autoencoder repo's own files, or a pipeline's vae/ folder.
FILES = ["config.json", *WEIGHTS[:1], "vae/config.json", f"vae/{WEIGHTS[0]}"]


# Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
# Models"), with flow matching in the latent space as in Dao et al. 2023, "Flow Matching in
# Latent Space" (LFM), and DiT/SiT on SD-VAE latents.
class Autoencoder(Space):
    """A pretrained autoencoder's latent space: encode is the posterior's mode (deterministic,
    so the encoded cache holds it), normalised with the autoencoder's own factors as
    diffusers pipelines do, z = (mode - shift) * scaling, and decode inverts that.

    Args:
        vae: a diffusers AutoencoderKL or AutoencoderDC, in eval mode, frozen.
        source: where it came from (recorded with models trained on it).
        digest: sha256 of its weights file (part of the encoded cache's key).
        dtype: the precision it runs in.
    """

    def __init__(self, vae: nn.Module, source: str, digest: str, dtype: torch.dtype) -> None:
        self.vae, self.source, self.digest, self.dtype = vae, source, digest, dtype
        config = vae.config
        self.kind = type(vae).__name__
        blocks = config.block_out_channels if self.kind == "AutoencoderKL" else (
            config.encoder_block_out_channels
        )  # fmt: skip
        self.factor = 2 ** (len(blocks) - 1)
        self.channels = int(config.latent_channels)
        self.scaling = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift = 0.0 if shift is None else float(shift)
        self.in_channels = int(config.in_channels)

    lossless = False
    images = False
    encoded_once = True

    def shape(self, channels: int, image_size: int) -> tuple[int, int]:
        if channels != self.in_channels:
            raise ValueError(
                f"the autoencoder takes {self.in_channels}-channel images, not {channels}"
            )
        if image_size % self.factor:
            raise ValueError(
                f"--image-size {image_size} is not a multiple of the autoencoder's "
                f"downsampling factor {self.factor}"
            )
        return self.channels, image_size // self.factor

    def _on(self, device: torch.device) -> nn.Module:
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        return self.vae

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        vae = self._on(images.device)
        out = vae.encode(images.to(self.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
        return (z.float() - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        vae = self._on(x.device)
        z = x.float() / self.scaling + self.shift
        return vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)

    def noise(self, n: int, channels: int, image_size: int, generator: torch.Generator) -> Tensor:
        c, s = self.shape(channels, image_size)
        return torch.randn(n, c, s, s, generator=generator)

    def fingerprint(self) -> str:
        return json.dumps(
            {"weights": self.digest, "scaling": self.scaling, "shift": self.shift,
             "dtype": str(self.dtype)}, sort_keys=True,
        )  # fmt: skip

    def record(self, options: dict) -> dict:
        return {**options, "model": self.source}


def autoencoder(*, model: str, subfolder: str | None = None, dtype: str = "float32") -> Autoencoder:
    """A diffusers AutoencoderKL or AutoencoderDC's latent space. `model`: a folder with
    config.json and diffusion_pytorch_model.safetensors (what save_pretrained writes; a
    pipeline folder's vae/ is found), or a Hugging Face Hub id, read from the cache offline.
    `subfolder`: the autoencoder's folder inside it. `dtype`: float32 or bfloat16 (on a GPU)."""
    if dtype not in ("float32", "bfloat16"):
        raise FmkitError(f"--space-opt dtype must be float32 or bfloat16, got {dtype}")
    source = str(model) if is_repo_id(model) else str(Path(model).expanduser().resolve())
    folder = _folder(locate(model, FILES), subfolder, model)
    vae, digest = _load(str(folder.resolve()), dtype)
    return Autoencoder(vae, source, digest, getattr(torch, dtype))


def _folder(root: Path, subfolder: str | None, model: str) -> Path:
    where = "a folder with config.json and diffusion_pytorch_model.safetensors"
    candidates = [root / subfolder] if subfolder else [root, root / "vae"]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    if not root.exists():
        raise FmkitError(
            f"no autoencoder at {model}: give {where} (save_pretrained writes one), or a Hugging "
            "Face Hub id such as stabilityai/sd-vae-ft-ema"
        )
    raise FmkitError(f"{candidates[0]} is not an autoencoder folder: expected {where}")


@functools.lru_cache(maxsize=4)  # one load per process, however many spaces name it
def _load(folder: str, dtype: str) -> tuple[nn.Module, str]:
    try:
        import diffusers
    except ImportError:
        raise FmkitError(
            "--space autoencoder needs diffusers: pip install 'fmkit[latent]'"
        ) from None

    path = Path(folder)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FmkitError(f"{path / 'config.json'} cannot be read: {exc}") from None
    kind = config.get("_class_name")
    if kind not in KINDS:
        found = kind or "model of unknown class"
        raise FmkitError(f"{path} holds a {found}, not one of {', '.join(KINDS)}")
    weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise FmkitError(f"{path} has config.json but no weights ({' or '.join(WEIGHTS)})")
    verbosity = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # its advice on `accelerate` is not for our users
    try:
        vae = getattr(diffusers, kind).from_pretrained(
            path, torch_dtype=getattr(torch, dtype), low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmkitError(f"{path}: the autoencoder cannot be loaded: {first}") from None
    finally:
        diffusers.logging.set_verbosity(verbosity)
    vae = vae.eval().requires_grad_(False)
    return vae, _sha256(weights)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@hookimpl
def register_spaces(register):
    register("autoencoder", autoencoder)

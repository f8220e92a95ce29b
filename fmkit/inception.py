"""The feature network of FID and its relatives: torch-fidelity's Inception-v3 (the network of
the original TensorFlow FID, ported bit-exactly), 2048-d pool features of uint8 images."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fmkit.errors import FmkitError

BACKEND_MODE = (
    "inception-v3-compat"  # torch-fidelity's port of the TF FID Inception, pool3 features
)
# How images reach the network: torch-fidelity's port resizes like TensorFlow 1 did.
RESIZE = "uint8 images, bilinear resize to 299x299 as TensorFlow 1 does (torch-fidelity)"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub's naming
WEIGHTS_ENV = "FMKIT_INCEPTION_WEIGHTS"


def _fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise FmkitError("evaluation needs torch-fidelity: pip install 'fmkit[eval]'") from None
    return torch_fidelity


def backend_name() -> str:
    return f"torch-fidelity {_fidelity().__version__}"


@dataclass
class Inception:
    """The feature network and what identifies its weights (part of every cache key)."""

    model: torch.nn.Module
    weights_id: str  # "official", or "sha256:" and the start of another weights file's digest
    device: torch.device


def load_inception(weights: Path | None = None, device: torch.device | str = "cpu") -> Inception:
    """torch-fidelity's Inception-v3. `weights` (or $FMKIT_INCEPTION_WEIGHTS) is a local
    weights file; otherwise torch-fidelity downloads the official one once into the torch hub
    cache. With FMKIT_OFFLINE=1 nothing is downloaded."""
    _fidelity()  # a clear error when torch-fidelity is missing
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torch_fidelity.utils import create_feature_extractor

    device = torch.device(device)
    weights = weights or (Path(os.environ[WEIGHTS_ENV]) if os.environ.get(WEIGHTS_ENV) else None)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    help_line = (
        f"download {URL_INCEPTION_V3} and pass --inception-weights FILE "
        f"(or set {WEIGHTS_ENV}, or put it at {hub_file})"
    )
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FmkitError(f"Inception weights {weights} do not exist; {help_line}")
        try:  # refuse files that would run code: only plain tensors may be inside
            torch.load(weights, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise FmkitError(
                f"{weights} is not a plain Inception state dict ({type(exc).__name__})"
            ) from None
        weights_id = _identify(weights)
    else:
        if not hub_file.is_file() and os.environ.get("FMKIT_OFFLINE"):
            raise FmkitError(f"no Inception weights and FMKIT_OFFLINE is set; {help_line}")
        weights_id = "official"
    try:
        model = create_feature_extractor(
            BACKEND_MODE,
            ["2048"],
            cuda=device.type == "cuda",
            feature_extractor_weights_path=str(weights) if weights else None,
            verbose=False,
        )
    except (OSError, RuntimeError) as exc:  # no network, truncated file, wrong keys
        raise FmkitError(
            f"could not load the Inception weights ({type(exc).__name__}); {help_line}"
        ) from None
    return Inception(model, weights_id, device)


def _identify(weights: Path) -> str:
    """ "official" for a copy of torch-fidelity's file (its name carries the first 8 hex digits
    of its SHA-256, as torch hub files do), else "sha256:" and the first 12 of the file's, said
    aloud: scores made with other weights compare only with scores made with the same file."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest.startswith(OFFICIAL_SHA256_PREFIX):
        return "official"
    print(
        f"note: the Inception weights {weights} (SHA-256 {digest[:12]}...) are not torch-fidelity's "
        f"official file ({OFFICIAL_SHA256_PREFIX}...); FID, KID and precision/recall compare only "
        "with scores made with the same file (the record names it)",
        file=sys.stderr,
    )
    return f"sha256:{digest[:12]}"


@torch.no_grad()
def inception_features(net: Inception, images: Tensor, batch_size: int = 64) -> Tensor:
    """(N, 3, H, W) uint8 images -> (N, 2048) float64 pool features."""
    out = []
    for chunk in images.split(batch_size):
        (features,) = net.model(chunk.to(net.device))
        out.append(features.double().cpu())
    return torch.cat(out)

"""Where training and sampling run, and how fast: the device, and the choices that are fmkit's
defaults on a GPU (bf16 autocast, channels_last, TF32, fused AdamW) and off on the CPU, where
the same code runs in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmkit.errors import FmkitError


def resolve_device(name: str) -> torch.device:
    """ "auto", "cpu" or "cuda" as a device. On CUDA this also turns on TF32 matmuls and
    convolutions, fmkit's default for fp32 work on a GPU (training and sampling alike)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FmkitError("--device cuda was asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@dataclass(frozen=True)
class Fast:
    """The speed choices of a training run.

    Attributes:
        bf16: autocast the forward and backward passes to bfloat16.
        memory_format: channels_last (NHWC) or contiguous.
        fused_adamw: one-kernel AdamW (torch >= 2.4 also has it on the CPU, where a test can
            run what a GPU run runs).
        compile: torch.compile the backbone (fmkit.compiled guards the first step).
    """

    bf16: bool
    memory_format: torch.memory_format
    fused_adamw: bool
    compile: bool = False


def choose(
    device: torch.device,
    precision: str,
    channels_last: bool | None,
    fused_adamw: bool | None,
    compile: bool | None = False,
) -> Fast:
    """`--precision auto` is bf16 on CUDA and fp32 elsewhere; channels_last, fused AdamW and
    torch.compile are on on CUDA unless a flag says otherwise (None: the device's default)."""
    cuda = device.type == "cuda"
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    nhwc = channels_last if channels_last is not None else cuda
    fused = fused_adamw if fused_adamw is not None else cuda
    compiled = compile if compile is not None else cuda
    return Fast(bf16, torch.channels_last if nhwc else torch.contiguous_format, fused, compiled)

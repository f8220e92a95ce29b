"""The DiT backbone: patchify, adaLN-Zero transformer blocks conditioned on time, unpatchify."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmkit import FmkitError

# name -> (width, depth, heads, patch size), as published in Peebles & Xie 2023, Table 1.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "DiT-S/2": (384, 12, 6, 2),
    "DiT-S/4": (384, 12, 6, 4),
    "DiT-S/8": (384, 12, 6, 8),
    "DiT-B/2": (768, 12, 12, 2),
    "DiT-B/4": (768, 12, 12, 4),
    "DiT-B/8": (768, 12, 12, 8),
    "DiT-L/2": (1024, 24, 16, 2),
    "DiT-L/4": (1024, 24, 16, 4),
    "DiT-XL/2": (1152, 28, 16, 2),
}
FREQ_DIM = 256  # width of the sinusoidal time features


def sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid * grid, width)."""
    if width % 4:
        raise FmkitError(f"dit: width {width} must be a multiple of 4")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / quarter)  # (W/4,)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None].float() * freqs[None]  # (N, W/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)  # (N, W)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample, shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled to 0..1000) -> MLP -> (B, D)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, 128)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1).to(self.mlp[0].weight.dtype))


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the time embedding sets shift, scale and a gate for the
    attention and MLP branches; the gates start at zero, so every block starts as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # each (B, D)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its patch of pixels."""

    def __init__(self, width: int, patch: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch * patch * channels)
        for layer in (self.ada[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


# Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT), as used for flow
# matching by Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative Models with
# Scalable Interpolant Transformers". Unconditional: no class embedding.
class DiT(nn.Module):
    """Diffusion Transformer predicting a velocity shaped like its input.

    Args:
        image_size: input height and width; a multiple of `patch_size`.
        channels: image channels (in and out).
        patch_size, width, depth, heads, mlp_ratio: the transformer's shape.
        two_times: also take a second time r (`cond["r"]`, from few-step objectives such as
            MeanFlow), whose embedding of r - t (zero-initialised) is added to the time's.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        two_times: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise FmkitError(
                f"dit: image size {image_size} is not a multiple of patch size {patch_size}"
            )
        if width % heads:
            raise FmkitError(f"dit: width {width} cannot be split into {heads} heads")
        self.patch, self.channels, self.grid = patch_size, channels, image_size // patch_size
        self.embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(width, self.grid)[None], persistent=False)
        self.time = TimeEmbedding(width)
        self.gap = None
        if two_times:
            self.gap = TimeEmbedding(width)
            nn.init.zeros_(self.gap.mlp[-1].weight)
            nn.init.zeros_(self.gap.mlp[-1].bias)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch_size, channels)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) in [0, 1] -> velocity (B, C, H, W); with two_times,
        cond["r"] (B,) is the second time (r = t when absent)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.time(t)  # (B, D)
        if self.gap is not None:
            r = t if cond is None or "r" not in cond else cond["r"].expand(x.shape[0])
            c = c + self.gap(r - t)
        elif cond is not None and "r" in cond:
            raise FmkitError("dit: this objective passes a second time r; use two_times=true")
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)  # (B, N, p*p*C)
        b, g, p = x.shape[0], self.grid, self.patch
        h = h.view(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(b, self.channels, g * p, g * p)


def dit(
    *,
    image_size: int,
    channels: int,
    preset: str = "DiT-S/2",
    patch_size: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    two_times: bool = False,
) -> DiT:
    """Diffusion Transformer (Peebles & Xie 2023); options preset (DiT-S/2, DiT-B/2, ...), ..."""
    if preset not in PRESETS:
        raise FmkitError(f"dit: unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    w, d, h, p = PRESETS[preset]
    return DiT(
        image_size, channels, patch_size or p, width or w, depth or d, heads or h, mlp_ratio,
        two_times,
    )  # fmt: skip

"""The UNet backbone of DDPM (Ho et al. 2020) and its ADM refinements (Dhariwal & Nichol 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmkit import Condition, DataSpec, FmkitError, hookimpl
from fmkit.conditions import condition_kind


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of times (Vaswani et al. 2017, as used by DDPM).

    Args:
        t: (B,) times in [0, 1]; scaled by `scale` so the frequencies match DDPM's 0..1000 range.
        dim: embedding width.

    Returns:
        (B, dim) embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = scale * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM, but never one channel per group: the time and condition embedding
    # is added to each channel as a constant before this norm, and normalising a channel on its
    # own would subtract that constant again (narrow models were blind to t and conditions).
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """DDPM residual block: GroupNorm, SiLU, conv, + time embedding, GroupNorm, SiLU, dropout,
    conv; a 1x1 conv on the skip path when the width changes.

    With `scale_shift` the embedding instead scales and shifts the second normalised
    activations, h = norm(h) * (1 + scale) + shift (ADM's "scale-shift norm", Dhariwal &
    Nichol 2021), which conditions every channel more strongly than an added bias.
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool = False
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity (ADM).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, out or 2 out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions (DDPM; multi-head as in ADM)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise FmkitError(f"unet: {channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_image_size(
    image_size: int, channel_mult: tuple[int, ...], attn_resolutions: tuple[int, ...]
) -> list[int]:
    """The feature-map size of each level; an error when the image cannot be halved that often
    or an attention resolution never occurs."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor or image_size % factor:
        raise FmkitError(
            f"unet: image size {image_size} must be a multiple of {factor} "
            f"({len(channel_mult)} levels halve it {len(channel_mult) - 1} times)"
        )
    sizes = [image_size // 2**level for level in range(len(channel_mult))]
    missing = sorted(set(attn_resolutions) - set(sizes))
    if missing:
        raise FmkitError(
            f"unet: attention resolution {missing[0]} never occurs at image size {image_size}; "
            f"feature-map sizes are {', '.join(map(str, sizes))}"
        )
    return sizes


# Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (architecture, Appendix B), with the
# multi-head attention and zero-initialised output layers of Dhariwal & Nichol 2021,
# "Diffusion Models Beat GANs on Image Synthesis".
class UNet(nn.Module):
    """DDPM/ADM UNet predicting a velocity shaped like its input.

    The defaults follow the seed project (64 base channels), with a time embedding as wide as
    the first level, which diffusers' UNet2DModel requires (the seed's explicit
    `time_emb_dim=128` still works, and exports to ONNX). With base_channels=128,
    channel_mult=(1, 2, 2, 2) at 32x32 it is DDPM's 35.7M CIFAR-10 model; with
    channel_mult=(1, 2, 2, 2, 4) at 64x64 it is DDIM's 78.7M CelebA model.

    Args:
        in_channels: image channels (also the output channels).
        time_emb_dim: width of the sinusoidal time embedding (None: base_channels); an MLP
            maps it to 4 * base_channels, which every residual block receives.
        base_channels: width of the first level.
        channel_mult: width multiplier of each level; each level after the first halves the
            feature map.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes (16 means 16x16) that get self-attention.
        dropout: dropout inside residual blocks.
        num_heads: attention heads.
        image_size: training image size; places the attention layers.
        condition: conditions the model takes (a class or binary attributes), embedded and
            added to the time embedding; None (or kind "none") for an unconditional model.
        scale_shift: residual blocks scale and shift their normalised activations by the
            embedding (ADM) instead of adding it (DDPM).
        two_times: also take a second time r (`cond["r"]`, from few-step objectives such as
            MeanFlow): the embedding of r - t is added to the time embedding, through a
            zero-initialised layer so that the untrained r-path leaves the model unchanged.
    """

    def __init__(
        self,
        in_channels: int = 3,
        time_emb_dim: int | None = None,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        image_size: int = 64,
        condition: Condition | None = None,
        scale_shift: bool = False,
        two_times: bool = False,
    ) -> None:
        super().__init__()
        if not channel_mult or min(channel_mult) < 1 or num_res_blocks < 1 or base_channels < 1:
            raise FmkitError("unet: channel_mult, num_res_blocks and base_channels must be >= 1")
        time_emb_dim = base_channels if time_emb_dim is None else time_emb_dim
        if time_emb_dim < 2:
            raise FmkitError("unet: time_emb_dim must be at least 2")
        sizes = check_image_size(image_size, channel_mult, attn_resolutions)
        # What the model was built with, for exporters (fmkit_plugins.unet_diffusers).
        self.arch = dict(
            in_channels=in_channels,
            time_emb_dim=time_emb_dim,
            base_channels=base_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attn_levels=tuple(size in attn_resolutions for size in sizes),
            dropout=dropout,
            num_heads=num_heads,
            image_size=image_size,
            scale_shift=scale_shift,
            two_times=two_times,
        )
        self.time_emb_dim = time_emb_dim
        emb = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(time_emb_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.gap_mlp = None
        if two_times:
            self.gap_mlp = nn.Sequential(
                nn.Linear(time_emb_dim, emb), nn.SiLU(), nn.Linear(emb, emb)
            )
            nn.init.zeros_(self.gap_mlp[-1].weight)
            nn.init.zeros_(self.gap_mlp[-1].bias)
        self.cond_emb = None
        if condition is not None and condition.kind != "none":
            # Added to the time embedding, as ADM adds its class embedding.
            self.cond_emb = condition_kind(condition.kind).embedding(condition, emb)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def stage(in_ch: int, out_ch: int, size: int) -> nn.ModuleList:
            layers = [ResBlock(in_ch, out_ch, emb, dropout, scale_shift)]
            if size in attn_resolutions:
                layers.append(AttnBlock(out_ch, num_heads))
            return nn.ModuleList(layers)

        # Down path; `widths` remembers every output the up path concatenates back in.
        self.down = nn.ModuleList()
        widths = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, base_channels * mult, sizes[level]))
                ch = base_channels * mult
                widths.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                widths.append(ch)
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb, dropout, scale_shift),
                AttnBlock(ch, num_heads),
                ResBlock(ch, ch, emb, dropout, scale_shift),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(ch + widths.pop(), base_channels * mult, sizes[level]))
                ch = base_channels * mult
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output: the untrained model predicts zero velocity instead of noise.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self._min_size = 2 ** (len(channel_mult) - 1)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        """Velocity at (x, t) given the conditions.

        Args:
            x: (B, C, H, W) states; H and W multiples of 2 ** (levels - 1).
            t: (B,) times in [0, 1] (a 0-dim t is broadcast).
            cond: {"class": (B,)} or {"attributes": (B, K)}, -1 for unspecified; None is all
                unspecified (see fmkit.batch). An unconditional model ignores it. With
                two_times, "r": (B,) the second time (r = t when absent).
        """
        if x.shape[-1] % self._min_size or x.shape[-2] % self._min_size:
            raise FmkitError(
                f"unet: input {tuple(x.shape[-2:])} is not a multiple of {self._min_size}"
            )
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.time_emb_dim).to(x.dtype))  # (B, 4C)
        if self.gap_mlp is not None:
            r = t if cond is None or "r" not in cond else cond["r"].expand(x.shape[0])
            emb = emb + self.gap_mlp(timestep_embedding(r - t, self.time_emb_dim).to(x.dtype))
        elif cond is not None and "r" in cond:
            raise FmkitError("unet: this objective passes a second time r; use two_times=true")
        if self.cond_emb is not None:
            emb = emb + self.cond_emb(cond, x.shape[0], x.device).to(emb.dtype)
        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)

    def to_diffusers(self) -> tuple[dict, dict[str, Tensor]]:
        """This model as a diffusers `UNet2DModel`: its config and state dict (exact mapping;
        an FmkitError names what cannot be mapped). See fmkit_plugins.unet_diffusers."""
        from fmkit_plugins.unet_diffusers import to_diffusers

        return to_diffusers(self)

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


def unet(
    *,
    image_size: int,
    channels: int,
    base_channels: int = 64,
    channel_mult: tuple[int, ...] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attn_resolutions: tuple[int, ...] = (16,),
    dropout: float = 0.1,
    num_heads: int = 1,
    time_emb_dim: int | None = None,
    scale_shift: bool = False,
    two_times: bool = False,
    data: DataSpec | None = None,
) -> UNet:
    """DDPM/ADM UNet (Ho et al. 2020); options base_channels, channel_mult, num_res_blocks, ..."""
    return UNet(
        in_channels=channels,
        time_emb_dim=time_emb_dim,
        base_channels=base_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions,
        dropout=dropout,
        num_heads=num_heads,
        image_size=image_size,
        condition=data.condition if data is not None else None,
        scale_shift=scale_shift,
        two_times=two_times,
    )


# Models written by fmkit before 0.2.0 that left time_emb_dim out have a 128-wide one.
unet.defaults_before = {"0.2.0": {"time_emb_dim": 128}}


@hookimpl
def register_backbones(register):
    register("unet", unet)

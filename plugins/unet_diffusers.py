"""The built-in UNet as a diffusers `UNet2DModel`: config and weights, mapped exactly.

Both are the DDPM/ADM UNet, block for block: a sinusoidal time embedding and a two-layer MLP, per
level `num_res_blocks` residual blocks (with self-attention at the chosen resolutions) and a
strided-conv downsampler, a resnet-attention-resnet middle, and on the way up one more block
per level with nearest-neighbour + conv upsampling. What differs is naming, the attention's
fused qkv (ours a 1x1 conv, theirs three linear layers) and how conditions are embedded.

The exported model keeps fmkit's time convention, and diffusers' flow-matching scheduler is
told so (`invert_sigmas`, see fmkit.export): `timestep` is 1000 t with t = 0 noise and t = 1
data, and the output is the velocity dx/dt.

Conditions become `class_labels`: diffusers' class embedding is one lookup table, which the
condition kind's embedding builds (`class_table()`) and whose rows its `class_labels` picks
(fmkit_plugins.conditions: a class index, or K for "unspecified"; for K attributes a table of
3**K rows). A kind whose embedding is not a lookup table cannot be exported to diffusers.
"""

from __future__ import annotations

from torch import Tensor, nn

from fmkit import FmkitError


def to_diffusers(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(UNet2DModel config, its state dict) for a `fmkit_plugins.unet.UNet`."""
    arch = model.arch
    base, mult = arch["base_channels"], arch["channel_mult"]
    widths = [base * m for m in mult]
    _check(model, arch, widths)
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    config = {
        "sample_size": arch["image_size"],
        "in_channels": arch["in_channels"],
        "out_channels": arch["in_channels"],
        "time_embedding_type": "positional",
        # Our sinusoid: sin then cos, frequencies 10000^(-k / (half - 1)).
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": [
            "AttnDownBlock2D" if attn else "DownBlock2D" for attn in arch["attn_levels"]
        ],
        "up_block_types": [
            "AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(arch["attn_levels"])
        ],
        "block_out_channels": widths,
        "layers_per_block": arch["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "dropout": arch["dropout"],
        "act_fn": "silu",
        "attention_head_dim": _head_dim(arch, widths),
        "norm_num_groups": groups.pop(),
        "attn_norm_num_groups": model.mid[1].norm.num_groups,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if arch["scale_shift"] else "default",
        "add_attention": True,
    }
    state: dict[str, Tensor] = {}
    _copy(state, "conv_in", model.conv_in)
    _copy(state, "time_embedding.linear_1", model.time_mlp[0])
    _copy(state, "time_embedding.linear_2", model.time_mlp[2])
    if model.cond_emb is not None:
        table = _class_table(model.cond_emb)
        config["num_class_embeds"] = len(table)
        state["class_embedding.weight"] = table
    _copy_path(state, "down_blocks", model.down, "downsamplers")
    _resblock(state, "mid_block.resnets.0", model.mid[0])
    _attention(state, "mid_block.attentions.0", model.mid[1])
    _resblock(state, "mid_block.resnets.1", model.mid[2])
    _copy_path(state, "up_blocks", model.up, "upsamplers")
    _copy(state, "conv_norm_out", model.norm_out)
    _copy(state, "conv_out", model.conv_out)
    return config, {k: v.detach().clone().contiguous() for k, v in state.items()}


def _check(model: nn.Module, arch: dict, widths: list[int]) -> None:
    """One-line errors for the UNets UNet2DModel cannot express."""
    if arch["two_times"]:
        raise FmkitError(
            "export: this UNet takes a second time r (two_times, for few-step objectives such "
            "as meanflow); diffusers' UNet2DModel has no input for it"
        )
    if arch["time_emb_dim"] != arch["base_channels"]:
        raise FmkitError(
            f"export: diffusers' UNet2DModel embeds time in base_channels = "
            f"{arch['base_channels']} dimensions, this model in time_emb_dim = "
            f"{arch['time_emb_dim']}; only models trained with time_emb_dim equal to "
            f"base_channels map to it: train with --backbone-opt time_emb_dim="
            f"{arch['base_channels']} (the default since fmkit 0.2.0), or export this one "
            f"with --format onnx"
        )
    if arch["channel_mult"][0] != 1:
        raise FmkitError(
            f"export: UNet2DModel's input conv is as wide as its first level; this model's "
            f"first level is {arch['channel_mult'][0]}x its input conv (channel_mult must "
            f"start with 1)"
        )
    if arch["time_emb_dim"] < 4:
        raise FmkitError("export: diffusers needs a time embedding of at least 4 dimensions")
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        raise FmkitError(
            f"export: this UNet normalises with {sorted(groups)} groups at different widths; "
            f"UNet2DModel uses one group count (base_channels of 64 or more, in multiples of "
            f"64, give 32 everywhere)"
        )


def _head_dim(arch: dict, widths: list[int]) -> int | None:
    """UNet2DModel's attention_head_dim: None means one head per block (its full width)."""
    heads = arch["num_heads"]
    if heads == 1:
        return None
    attended = {w for w, attn in zip(widths, arch["attn_levels"], strict=True) if attn}
    dims = {w // heads for w in attended | {widths[-1]}}
    if len(dims) != 1:
        raise FmkitError(
            f"export: {heads} heads give head widths {sorted(dims)} at different levels; "
            f"UNet2DModel has one attention_head_dim"
        )
    return dims.pop()


def _class_table(cond: nn.Module) -> Tensor:
    """(rows, dim) diffusers' class-embedding table, which the condition kind's embedding
    builds (`class_table()`; see fmkit_plugins.conditions), or a one-line error."""
    build = getattr(cond, "class_table", None)
    if build is None:
        raise FmkitError(
            f"export: this model's condition embedding ({type(cond).__name__}) is not a lookup "
            "table, so diffusers' class_labels cannot express it; --format onnx can"
        )
    return build()


def _copy(state: dict, prefix: str, module: nn.Module) -> None:
    for name, tensor in module.state_dict().items():
        state[f"{prefix}.{name}"] = tensor


def _copy_path(state: dict, prefix: str, stages: nn.ModuleList, scaler: str) -> None:
    """Our flat list of stages ([ResBlock, AttnBlock?] per block, [Downsample] or [Upsample]
    between levels) -> diffusers' blocks of resnets (+ attentions) and a down/upsampler."""
    from fmkit_plugins.unet import Downsample, Upsample

    level, index = 0, 0
    for layers in stages:
        if isinstance(layers[0], (Downsample, Upsample)):
            _copy(state, f"{prefix}.{level}.{scaler}.0.conv", layers[0].conv)
            level, index = level + 1, 0
            continue
        _resblock(state, f"{prefix}.{level}.resnets.{index}", layers[0])
        if len(layers) > 1:
            _attention(state, f"{prefix}.{level}.attentions.{index}", layers[1])
        index += 1


def _resblock(state: dict, prefix: str, block: nn.Module) -> None:
    for ours, theirs in (
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("emb", "time_emb_proj"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
    ):
        _copy(state, f"{prefix}.{theirs}", getattr(block, ours))
    if isinstance(block.skip, nn.Conv2d):
        _copy(state, f"{prefix}.conv_shortcut", block.skip)


def _attention(state: dict, prefix: str, block: nn.Module) -> None:
    """Our fused 1x1-conv qkv -> to_q, to_k, to_v; heads are contiguous channel slices in
    both, so the split is along the output rows."""
    _copy(state, f"{prefix}.group_norm", block.norm)
    weight = block.qkv.weight.detach()[:, :, 0, 0]  # (3C, C)
    for name, w, b in zip(
        ("to_q", "to_k", "to_v"), weight.chunk(3), block.qkv.bias.detach().chunk(3), strict=True
    ):
        state[f"{prefix}.{name}.weight"] = w
        state[f"{prefix}.{name}.bias"] = b
    state[f"{prefix}.to_out.0.weight"] = block.proj.weight.detach()[:, :, 0, 0]
    state[f"{prefix}.to_out.0.bias"] = block.proj.bias.detach()

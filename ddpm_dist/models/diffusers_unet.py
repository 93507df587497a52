"""Our UNet as diffusers' `UNet2DModel` and back: the config (a plain dict, diffusers' config.json) and the weights'
names. The two networks compute the same function block by block; this maps names and splits our fused qkv
convolution into diffusers' to_q / to_k / to_v linears (and joins them back), so a round trip is bitwise.

Pure data: nothing here imports diffusers. What one side can express and the other cannot is a
`DiffusersMappingError`, one line naming the field."""

from __future__ import annotations

import re

import torch

from .unet import UNetConfig


class DiffusersMappingError(ValueError):
    """A config that diffusers' UNet2DModel (or ours) cannot express; the message names the field."""


UNET_CLASS = "UNet2DModel"
# UNet2DModel's settings that have one value in our network: (key, the value we need, what ours is).
FIXED = {
    "center_input_sample": (False, "our input is not re-centred"),
    "time_embedding_type": ("positional", "our time embedding is sinusoidal"),
    "time_embedding_dim": (None, "our time embedding is 4 x the first block's channels"),
    "mid_block_scale_factor": (1, "our residual sums are not rescaled"),
    "downsample_type": ("conv", "we downsample with a strided convolution"),
    "upsample_type": ("conv", "we upsample by nearest neighbour and a convolution"),
    "act_fn": ("silu", "our activation is SiLU"),
    "add_attention": (True, "our middle block has attention"),
    "class_embed_type": (None, "our class embedding is a table added to the time embedding"),
    "mid_block_type": ("UNetMidBlock2D", "our middle block is resnet, attention, resnet"),
}
DOWN, UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def _levels(cfg: UNetConfig) -> list[tuple[int, int, bool]]:
    """(channels, resolution, has attention) of each level, top (full resolution) first."""
    return [
        (cfg.base_channels * m, res := cfg.image_size // 2**i, res in cfg.attn_resolutions)
        for i, m in enumerate(cfg.channel_mults)
    ]


def to_diffusers_config(cfg: UNetConfig) -> dict:
    """UNet2DModel's config.json for our config, or a DiffusersMappingError naming what it cannot express."""
    if cfg.cond_channels:
        raise DiffusersMappingError(
            f"model.cond_channels={cfg.cond_channels}: diffusers' DDPM/DDIM pipelines have no conditioning input"
        )
    levels = _levels(cfg)
    attn_channels = {ch for ch, _, attn in levels if attn} | {levels[-1][0]}  # the middle block attends too
    head_dims = {ch // cfg.num_heads for ch in attn_channels}
    if cfg.num_heads > 1 and len(head_dims) > 1:
        raise DiffusersMappingError(
            f"model.num_heads={cfg.num_heads}: diffusers' UNet2DModel has one attention_head_dim for every block, "
            f"and {cfg.num_heads} heads over {sorted(attn_channels)} channels are {sorted(head_dims)} per head"
        )
    scale_shift = cfg.time_conditioning == "scale_shift"
    return {
        "_class_name": UNET_CLASS,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "block_out_channels": [ch for ch, _, _ in levels],
        "down_block_types": [DOWN[attn] for _, _, attn in levels],
        "up_block_types": [UP[attn] for _, _, attn in reversed(levels)],
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": None if cfg.num_heads == 1 else head_dims.pop(),
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "dropout": cfg.dropout,
        "resnet_time_scale_shift": "scale_shift" if scale_shift else "default",
        "freq_shift": cfg.time_freq_shift,
        "flip_sin_to_cos": cfg.time_flip_sin_to_cos,
        "downsample_padding": cfg.downsample_padding,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,  # + our null class (guidance)
        **{key: value for key, (value, _) in FIXED.items()},
    }


def _get(config: dict, key: str, default=None):
    return config[key] if config.get(key) is not None else default


def from_diffusers_config(config: dict) -> UNetConfig:
    """Our config for a UNet2DModel config.json, or a DiffusersMappingError naming the field we cannot express.
    A class-conditional model's last class is taken as the null class of classifier-free guidance (ours puts it
    there); an export of ours carries num_classes itself."""
    if config.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise DiffusersMappingError(f"_class_name: {config['_class_name']!r} is not {UNET_CLASS}")
    for key, (value, why) in FIXED.items():
        if key in config and config[key] != value and not (key == "time_embedding_dim" and _time_dim_ok(config)):
            raise DiffusersMappingError(f"{key}: {config[key]!r} is not {value!r} ({why})")
    channels = list(config.get("block_out_channels", (224, 448, 672, 896)))
    base = channels[0]
    if any(c % base for c in channels):
        raise DiffusersMappingError(f"block_out_channels: {channels} are not multiples of the first")
    down = list(
        config.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    )
    up = list(config.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    for key, blocks, known in (("down_block_types", down, DOWN), ("up_block_types", up, UP)):
        if len(blocks) != len(channels) or any(b not in known for b in blocks):
            raise DiffusersMappingError(f"{key}: {blocks} (we map {' and '.join(known)}, one per block_out_channels)")
    attn = [b == DOWN[1] for b in down]
    if [b == UP[1] for b in reversed(up)] != attn:
        raise DiffusersMappingError(f"up_block_types: {up} do not mirror down_block_types {down} (ours attend alike)")
    size = int(config.get("sample_size") or 0)
    if not size:
        raise DiffusersMappingError("sample_size: needs one integer image size")
    in_ch = int(config.get("in_channels", 3))
    if int(config.get("out_channels", 3)) != in_ch:
        raise DiffusersMappingError(f"out_channels: {config.get('out_channels')} is not in_channels {in_ch}")
    groups = int(_get(config, "norm_num_groups", 32))
    scale_shift = _get(config, "resnet_time_scale_shift", "default")
    if scale_shift not in ("default", "scale_shift"):
        raise DiffusersMappingError(f"resnet_time_scale_shift: {scale_shift!r} is not default or scale_shift")
    attn_groups = config.get("attn_norm_num_groups")
    if (attn_groups is None and scale_shift == "scale_shift") or attn_groups not in (None, groups):
        raise DiffusersMappingError(
            f"attn_norm_num_groups: {attn_groups} (our attention normalises with norm_num_groups={groups})"
        )
    head_dim = config.get("attention_head_dim", 8)
    attn_channels = {c for c, a in zip(channels, attn) if a} | {channels[-1]}
    heads = {c // head_dim if head_dim else 1 for c in attn_channels}
    if len(heads) > 1 or (head_dim and any(c % head_dim for c in attn_channels)):
        raise DiffusersMappingError(
            f"attention_head_dim: {head_dim} over {sorted(attn_channels)} channels is not one number of heads"
        )
    class_embeds = config.get("num_class_embeds")
    cfg = UNetConfig(
        image_size=size,
        in_channels=in_ch,
        base_channels=base,
        channel_mults=[c // base for c in channels],
        num_res_blocks=int(_get(config, "layers_per_block", 2)),
        attn_resolutions=[size // 2**i for i, a in enumerate(attn) if a],
        num_heads=heads.pop(),
        dropout=float(_get(config, "dropout", 0.0)),
        time_conditioning="scale_shift" if scale_shift == "scale_shift" else "add",
        norm_groups=groups,
        num_classes=int(class_embeds) - 1 if class_embeds else 0,
        norm_eps=float(_get(config, "norm_eps", 1e-5)),
        downsample_padding=int(_get(config, "downsample_padding", 1)),
        time_freq_shift=int(_get(config, "freq_shift", 0)),
        time_flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise DiffusersMappingError(str(e)) from None
    return cfg


def _time_dim_ok(config: dict) -> bool:
    return config.get("time_embedding_dim") == 4 * list(config.get("block_out_channels", [224]))[0]


_RENAMES = [  # (ours, diffusers), for names inside a block; the blocks' own paths are mapped by _block_paths
    (".temb.", ".time_emb_proj."),
    (".skip.", ".conv_shortcut."),
]


def _block_paths(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(our prefix, diffusers' prefix) of every module that holds weights."""
    pairs = [("time_mlp.0.", "time_embedding.linear_1."), ("time_mlp.2.", "time_embedding.linear_2.")]
    pairs += [("class_emb.", "class_embedding."), ("conv_in.", "conv_in."), ("norm_out.", "conv_norm_out.")]
    pairs += [("conv_out.", "conv_out.")]
    n = len(cfg.channel_mults)
    for i in range(n):
        for path, blocks in (("down", cfg.num_res_blocks), ("up", cfg.num_res_blocks + 1)):
            for j in range(blocks):
                pairs.append((f"{path}.{i}.blocks.{j}.", f"{path}_blocks.{i}.resnets.{j}."))
                pairs.append((f"{path}.{i}.attns.{j}.", f"{path}_blocks.{i}.attentions.{j}."))
        pairs.append((f"down.{i}.resample.conv.", f"down_blocks.{i}.downsamplers.0.conv."))
        pairs.append((f"up.{i}.resample.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    pairs += [
        ("mid.0.", "mid_block.resnets.0."),
        ("mid.1.", "mid_block.attentions.0."),
        ("mid.2.", "mid_block.resnets.1."),
    ]
    return pairs


def _rename(name: str, pairs: list[tuple[str, str]], forward: bool) -> str:
    for ours, theirs in pairs:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if name.startswith(src):
            name = dst + name[len(src) :]
            break
    else:
        raise DiffusersMappingError(f"weight {name!r} has no counterpart in {'diffusers' if forward else 'ours'}")
    for ours, theirs in _RENAMES:
        name = name.replace(*((ours, theirs) if forward else (theirs, ours)))
    return name


# diffusers before 0.14 (and the DDPM weights published then) named the attention's linears so; it still reads them.
LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN = re.compile(r"(.*attentions\.\d+\.)(norm|qkv|proj)\.(weight|bias)$")


def to_diffusers_state(cfg: UNetConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in UNet2DModel's names and shapes (qkv split, 1x1 convolutions as linears)."""
    pairs, out = _block_paths(cfg), {}
    for name, value in state.items():
        mapped = _rename(name, pairs, forward=True)
        m = _ATTN.match(mapped)
        if not m:
            out[mapped] = value
        elif m[2] == "norm":
            out[f"{m[1]}group_norm.{m[3]}"] = value
        elif m[2] == "proj":
            out[f"{m[1]}to_out.0.{m[3]}"] = value.flatten(1) if m[3] == "weight" else value
        else:
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{m[1]}{part}.{m[3]}"] = (chunk.flatten(1) if m[3] == "weight" else chunk).contiguous()
    return out


def from_diffusers_state(cfg: UNetConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict in our names and shapes; a DiffusersMappingError names a weight we do not have."""
    pairs, out, qkv = _block_paths(cfg), {}, {}
    for name, value in state.items():
        name = re.sub(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.", lambda m: m[1] + LEGACY[m[2]] + ".", name)
        m = re.match(r"(.*attentions\.\d+\.)(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", name)
        if m is None:
            out[_rename(name, pairs, forward=False)] = value
            continue
        prefix = _rename(m[1], pairs, forward=False)
        if m[2] == "group_norm":
            out[f"{prefix}norm.{m[3]}"] = value
        elif m[2] == "to_out.0":
            out[f"{prefix}proj.{m[3]}"] = value[:, :, None, None] if m[3] == "weight" else value
        else:
            qkv.setdefault((prefix, m[3]), {})[m[2]] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise DiffusersMappingError(f"weights {prefix}: needs to_q, to_k and to_v, found {sorted(parts)}")
        joined = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
        out[f"{prefix}qkv.{kind}"] = joined[:, :, None, None] if kind == "weight" else joined
    return out

"""The DDPM UNet (Ho et al. 2020) for one device: residual blocks conditioned on the timestep
(FiLM scale-shift, or the paper's additive bias), self-attention at chosen resolutions, optional
class embedding with a null class for classifier-free guidance, optional conditioning channels.

Activation checkpointing (`activation_checkpointing`: "block" or "level") recomputes the chosen modules'
activations in backward instead of keeping them. It runs inside each module's own forward, so on a module FSDP
shards, its hooks stay outside the recomputed region (as torchtitan's checkpoint wrapper inside fully_shard)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("", "block", "level")  # off | each ResBlock and attention block | each level and middle block
# Fields that change how the network runs, not its weights: a checkpoint resumes across a change of them.
RUNTIME_FIELDS = ("activation_checkpointing",)


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 1
    dropout: float = 0.1
    time_conditioning: str = "scale_shift"  # or "add"
    norm_groups: int = 32
    num_classes: int = 0  # 0 = unconditional; otherwise index num_classes is the null class
    cond_channels: int = 0  # channels concatenated to the input (e.g. an upsampled low-res image)
    activation_checkpointing: str = ""  # "" off | "block" | "level": recompute in backward, training only
    # Variants of published networks (diffusers' UNet2DModel names them the same; google/ddpm-cifar10-32, the DDPM
    # paper's TensorFlow network, uses 1e-6, 0 and 1): they change the arithmetic, not the parameters.
    norm_eps: float = 1e-5  # of every GroupNorm
    downsample_padding: int = 1  # 1: pad each side; 0: pad right and bottom by one (TensorFlow's "SAME", stride 2)
    time_freq_shift: int = 0  # sinusoid frequencies exp(-ln(10^4) k / (half - shift))
    time_flip_sin_to_cos: bool = False  # embedding [cos, sin] instead of [sin, cos]

    def validate(self) -> None:
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by 2^{len(self.channel_mults) - 1} "
                f"(one halving per extra level)"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"model.norm_groups={self.norm_groups} does not divide {self.base_channels * m} channels"
                )
            if (self.base_channels * m) % self.num_heads:
                raise ValueError(f"model.num_heads={self.num_heads} does not divide {self.base_channels * m} channels")
        if self.time_conditioning not in ("scale_shift", "add"):
            raise ValueError(f"model.time_conditioning: '{self.time_conditioning}' is not scale_shift or add")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"model.downsample_padding: {self.downsample_padding} is not 0 or 1")
        if not 0 <= self.time_freq_shift < self.base_channels // 2:
            raise ValueError(f"model.time_freq_shift: {self.time_freq_shift} is not in [0, {self.base_channels // 2})")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps: must be positive, got {self.norm_eps}")
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"model.activation_checkpointing: '{self.activation_checkpointing}' is not '', block or level"
            )


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0, flip: bool = False
) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps (float32 whatever the autocast)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    args = t.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip else [sin, cos], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Checkpointable(nn.Module):
    """A module whose forward (`_forward`) is recomputed in backward when `checkpointed` is set, in training only.
    Non-reentrant checkpoint: keyword arguments, no-grad inputs and compile work; the RNG state (dropout) is
    restored for the recomputation, so the gradients equal those without it."""

    checkpointed = False

    def forward(self, *args, **kwargs):
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)


class ResBlock(Checkpointable):
    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int, scale_shift: bool, eps: float
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        cond = self.temb(F.silu(temb))[:, :, None, None]
        if self.scale_shift:  # FiLM: norm(h) * (1 + scale) + shift
            scale, shift = cond.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + cond)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(Checkpointable):
    def __init__(self, ch: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def _forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x, temb=None):
        return self.conv(x if self.conv.padding[0] else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(Checkpointable):
    """The blocks of one resolution (res blocks, each optionally followed by attention) plus the resampler.
    It is the unit FSDP shards; for the up path, it also pops the skip connections it consumes."""

    def __init__(
        self, blocks: list[nn.Module], attns: list[Optional[nn.Module]], resample: Optional[nn.Module], up: bool
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList([a if a is not None else nn.Identity() for a in attns])
        self.resample = resample if resample is not None else nn.Identity()
        self.up = up

    def _forward(self, h, temb, skips: tuple = ()):
        """Down: returns (h, the skip tensors it made). Up: consumes `skips` (last first), returns h.
        Functional on purpose: FSDP's hooks may copy arguments, so a list mutated in place would be lost."""
        made, pending = [], list(skips)
        for block, attn in zip(self.blocks, self.attns):
            if self.up:
                h = torch.cat([h, pending.pop()], dim=1)
            h = block(h, temb)
            h = attn(h) if not isinstance(attn, nn.Identity) else h
            made.append(h)
        if not isinstance(self.resample, nn.Identity):
            h = self.resample(h)
            made.append(h)
        return h if self.up else (h, tuple(made))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch, groups, ss = cfg.base_channels, cfg.norm_groups, cfg.time_conditioning == "scale_shift"
        temb_dim = ch * 4
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch, 3, padding=1)

        def res(i, o):
            return ResBlock(i, o, temb_dim, cfg.dropout, groups, ss, cfg.norm_eps)

        def attn_at(res_, c):
            return Attention(c, cfg.num_heads, groups, cfg.norm_eps) if res_ in cfg.attn_resolutions else None

        skip_chs, cur, size = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(cur, out))
                attns.append(attn_at(size, out))
                cur = out
                skip_chs.append(cur)
            last = level == len(cfg.channel_mults) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(cur, cfg.downsample_padding), up=False))
            if not last:
                skip_chs.append(cur)
                size //= 2
        self.mid = nn.ModuleList([res(cur, cur), Attention(cur, cfg.num_heads, groups, cfg.norm_eps), res(cur, cur)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(cur + skip_chs.pop(), out))
                attns.append(attn_at(size, out))
                cur = out
            self.up.append(Level(blocks, attns, Upsample(cur) if level > 0 else None, up=True))
            if level > 0:
                size *= 2
        self.norm_out = nn.GroupNorm(groups, cur, cfg.norm_eps)
        self.conv_out = _zero(nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        ac = cfg.activation_checkpointing  # "level": the levels and the middle blocks; "block": each res/attention
        for m in self.modules():
            if isinstance(m, Checkpointable):
                m.checkpointed = (ac == "block" and not isinstance(m, Level)) or (
                    ac == "level" and (isinstance(m, Level) or any(m is b for b in self.mid))
                )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        c = self.config
        emb = timestep_embedding(t, c.base_channels, freq_shift=c.time_freq_shift, flip=c.time_flip_sin_to_cos)
        temb = self.time_mlp(emb.to(self.conv_in.weight.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.config.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        if self.config.cond_channels:
            if cond is None:
                raise ValueError("this model needs `cond` (conditioning channels)")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            h, made = level(h, temb)
            skips.extend(made)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for level in self.up:
            n = len(level.blocks)
            h = level(h, temb, tuple(skips[-n:]))
            del skips[-n:]
        return self.conv_out(F.silu(self.norm_out(h)))

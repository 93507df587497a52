"""Named model sizes. `ddpm-cifar10` is the DDPM paper's CIFAR-10 network (35.7M parameters):
the paper adds the time embedding to the features, so that preset uses time_conditioning='add';
FiLM scale-shift (improved DDPM) would add ~2.6M parameters."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Distributed and unit tests: a few seconds per step on a CPU.
    "tiny": dict(
        image_size=16,
        in_channels=3,
        base_channels=16,
        channel_mults=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        num_heads=2,
        dropout=0.0,
        norm_groups=8,
        num_classes=0,
    ),
    # The embedded 16x16 digits demo: class-conditional, trains to legible digits in minutes on 2 CPU cores.
    "digits": dict(
        image_size=16,
        in_channels=1,
        base_channels=32,
        channel_mults=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[4],
        num_heads=2,
        dropout=0.0,
        norm_groups=8,
        num_classes=10,
    ),
    # Ho et al. 2020, appendix B: ch 128, mults 1,2,2,2, two res blocks, attention at 16x16, dropout 0.1.
    "ddpm-cifar10": dict(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mults=[1, 2, 2, 2],
        num_res_blocks=2,
        attn_resolutions=[16],
        num_heads=1,
        dropout=0.1,
        time_conditioning="add",
        norm_groups=32,
        num_classes=0,
    ),
    # Improved DDPM's ImageNet 64x64 shape (scale-shift, multi-head attention at 16 and 8), class-conditional.
    "imagenet64": dict(
        image_size=64,
        in_channels=3,
        base_channels=128,
        channel_mults=[1, 2, 3, 4],
        num_res_blocks=3,
        attn_resolutions=[16, 8],
        num_heads=4,
        dropout=0.1,
        norm_groups=32,
        num_classes=1000,
    ),
}

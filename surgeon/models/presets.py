"""Tiny seeded model configs, built from configs alone (no downloads): the demo's default model and test models.

``build(name)`` returns a freshly initialized model; configs follow the diffusers test-suite style.
"""

from __future__ import annotations

from torch import nn

from surgeon.errors import SurgeonError
from surgeon.seeding import seeded


def unet2d(sample_size: int = 32, channels: int = 1) -> nn.Module:
    from diffusers.models import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def tiny_unet2d() -> nn.Module:
    from diffusers.models import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def tiny_unet2d_condition() -> nn.Module:
    from diffusers.models import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_unet1d() -> nn.Module:
    from diffusers.models import UNet1DModel

    return UNet1DModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 8, 16, 16),
        time_embedding_type="positional",
        use_timestep_embedding=True,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        out_block_type="OutConv1DBlock",
        mid_block_type="MidResTemporalBlock1D",
        down_block_types=("DownResnetBlock1D",) * 4,
        up_block_types=("UpResnetBlock1D",) * 3,
        act_fn="swish",
    )


def tiny_dit() -> nn.Module:
    from diffusers.models import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        norm_num_groups=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def chirodiff() -> nn.Module:
    """ChiroDiff as the seed paper trains it on KanjiVG: 3-layer bidirectional GRU, 96 hidden units."""
    from surgeon.models.chirodiff import ChiroDiffNet

    return ChiroDiffNet()


def tiny_chirodiff() -> nn.Module:
    from surgeon.models.chirodiff import ChiroDiffNet

    return ChiroDiffNet(hidden=16, layers=2)


PRESETS = {
    "chirodiff": chirodiff,
    "tiny-chirodiff": tiny_chirodiff,
    "unet-kanji": unet2d,
    "tiny-unet": tiny_unet2d,
    "tiny-unet-cond": tiny_unet2d_condition,
    "tiny-unet1d": tiny_unet1d,
    "tiny-dit": tiny_dit,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialized preset; its weights depend on ``seed`` only (the caller's RNG is left alone)."""
    if name not in PRESETS:
        raise SurgeonError(f"unknown preset {name!r}", f"choose one of: {', '.join(PRESETS)}")
    with seeded(seed):
        return PRESETS[name]()

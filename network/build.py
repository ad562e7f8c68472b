"""build_model: the one place a --backbone name becomes a network."""

from __future__ import annotations

from torch import nn

from helpers import UserError
from network.backbone import build_deep_stem_resnet, build_resnet
from network.deeplab import DeepLabv2, DeepLabv3Plus
from network.unimatch import UniMatchDeepLabv3Plus

BACKBONES = ("deeplabv3p", "deeplabv2", "deeplabv3p_unimatch")


def build_model(
    backbone: str = "deeplabv3p",
    num_classes: int = 21,
    output_dim: int = 256,
    resnet_depth: int = 101,
    pretrained: str = "none",
) -> nn.Module:
    """DeepLabv3+ (OS16), DeepLabv2 (OS8) or UniMatch's DeepLabv3+ (deep stem, OS16) on a dilated ResNet;
    model(x) -> (logits, representation)."""
    if backbone == "deeplabv3p":
        resnet = build_resnet(resnet_depth, pretrained, dilations=(1, 2))
        return DeepLabv3Plus(resnet, num_classes, output_dim)
    if backbone == "deeplabv2":
        return DeepLabv2(build_resnet(resnet_depth, pretrained, dilations=(2, 4)), num_classes, output_dim)
    if backbone == "deeplabv3p_unimatch":
        resnet = build_deep_stem_resnet(resnet_depth, pretrained)
        return UniMatchDeepLabv3Plus(resnet, num_classes, output_dim)
    raise UserError(f"--backbone {backbone!r} is not known: choose one of {', '.join(BACKBONES)}.")

"""UniMatch's DeepLabv3+ (Yang et al., CVPR 2023; LiheYoung/UniMatch), with its state_dict keys in order.

A deep-stem ResNet at output stride 16 under `backbone`, ASPP `head`, `reduce` (low-level features to 48
channels), `fuse` (two 3x3 convs), a 1x1 `classifier` with bias, and, last, ReCo's `representation` head on
the same concatenated features as in ReCo's DeepLabv3+ (UniMatch's own files lack it). Same interface as
network.deeplab.DeepLabv3Plus: forward(x, with_rep) -> (logits, rep) at stride 4, encode and decode.
"""

from __future__ import annotations

import torch
from torch import nn

from network.backbone import block_out_channels
from network.deeplab import conv_bn_relu
from network.resize import pooled_branch, resize_bilinear


class _Pooling(nn.Module):
    """Image-pooling branch under UniMatch's name `gap`: average, 1x1 conv, BN, ReLU, spread over the map."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_branch(x, self.gap, align_corners=True)


class _ASPP(nn.Module):
    """ASPP with UniMatch's names: b0 (1x1), b1-b3 (atrous 3x3), b4 (pooling), project (1x1 over the five)."""

    def __init__(self, in_ch: int, rates: tuple[int, int, int], out_ch: int):
        super().__init__()
        self.b0 = nn.Sequential(*conv_bn_relu(in_ch, out_ch, 1))
        self.b1, self.b2, self.b3 = (nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, rate)) for rate in rates)
        self.b4 = _Pooling(in_ch, out_ch)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.b0, self.b1, self.b2, self.b3, self.b4)
        return self.project(torch.cat([branch(x) for branch in branches], dim=1))


class UniMatchDeepLabv3Plus(nn.Module):
    """UniMatch's DeepLabv3+ on a deep-stem ResNet: forward -> (logits, rep), both at stride 4."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        output_dim: int = 256,
        rates: tuple[int, int, int] = (6, 12, 18),
    ):
        super().__init__()
        self.backbone = backbone
        low_ch, high_ch = block_out_channels(backbone.layer1[-1]), block_out_channels(backbone.layer4[-1])
        width = high_ch // 8  # 256 on ResNet-50/101, as UniMatch
        self.head = _ASPP(high_ch, rates, width)
        self.reduce = nn.Sequential(*conv_bn_relu(low_ch, 48, 1))
        self.fuse = nn.Sequential(*conv_bn_relu(width + 48, 256, 3), *conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.representation = nn.Sequential(*conv_bn_relu(width + 48, 256, 3), nn.Conv2d(256, output_dim, 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] -> (layer1 output at stride 4, layer4 output at stride 16)."""
        net = self.backbone
        low = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        return low, net.layer4(net.layer3(net.layer2(low)))

    def decode(
        self, low: torch.Tensor, high: torch.Tensor, with_rep: bool = True, rep_rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer1, layer4 features) of N images -> (logits [N,C,h,w], representation or None), at stride 4.

        rep_rows: the representation of the first rep_rows images only (None: all).
        """
        high = resize_bilinear(self.head(high), low.shape[-2:], align_corners=True)
        features = torch.cat([self.reduce(low), high], dim=1)
        logits = self.classifier(self.fuse(features))
        return logits, self.representation(features[:rep_rows]) if with_rep else None

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] -> (logits [B,C,h,w], representation [B,D,h,w] or None), h = ceil(H/4) after the stem."""
        return self.decode(*self.encode(x), with_rep=with_rep)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The ResNet's parameters (the rest is the head)."""
        return list(self.backbone.parameters())

"""DeepLabv3+ (output stride 16) and DeepLabv2 (output stride 8), each with ReCo's representation head.

forward(x, with_rep=False) skips the representation head (it is only needed by the ReCo loss) and returns
(logits, None). Module names are the reference's, so its published state_dicts load strictly
(tests/data/checkpoint_keys_*.json). DeepLabv3+ also splits into encode(x) -> (low, high) and
decode(low, high, ...), so a method can perturb the features between the two (UniMatch's feature
perturbation).
"""

from __future__ import annotations

import torch
from torch import nn

from network.backbone import block_out_channels
from network.resize import pooled_branch, resize_bilinear


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    """[conv (1x1, or 3x3 padded to keep the size), BN, ReLU], the unit both DeepLabv3+ heads are made of."""
    padding = dilation if kernel == 3 else 0
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average, 1x1 conv, BN, ReLU, upsampled back to the input size."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_branch(x, self, align_corners=False)


class ASPP(nn.Module):
    """1x1 branch, three atrous 3x3 branches and image pooling, concatenated and projected to 256 channels."""

    def __init__(self, in_ch: int, rates: tuple[int, int, int] = (6, 12, 18), out_ch: int = 256):
        super().__init__()
        branches = [nn.Sequential(*conv_bn_relu(in_ch, out_ch, 1))]
        branches += [nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, rate)) for rate in rates]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*conv_bn_relu(out_ch * len(branches), out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class _ResNetStem(nn.Module):
    """Holds the backbone under the reference's attribute names (resnet_conv1 ... resnet_layer4)."""

    def _adopt(self, resnet: nn.Module) -> None:
        self.resnet_conv1, self.resnet_bn1 = resnet.conv1, resnet.bn1
        self.resnet_relu, self.resnet_maxpool = resnet.relu, resnet.maxpool
        self.resnet_layer1, self.resnet_layer2 = resnet.layer1, resnet.layer2
        self.resnet_layer3, self.resnet_layer4 = resnet.layer3, resnet.layer4

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] -> (layer1 output at stride 4, layer4 output)."""
        x = self.resnet_maxpool(self.resnet_relu(self.resnet_bn1(self.resnet_conv1(x))))
        low = self.resnet_layer1(x)
        return low, self.resnet_layer4(self.resnet_layer3(self.resnet_layer2(low)))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The ResNet's parameters (the rest is the head)."""
        return [p for name, p in self.named_parameters() if name.startswith("resnet_")]


class DeepLabv3Plus(_ResNetStem):
    """DeepLabv3+ at output stride 16 with a layer1 decoder: forward -> (logits, rep), both at stride 4."""

    def __init__(self, resnet: nn.Module, num_classes: int, output_dim: int = 256):
        super().__init__()
        self._adopt(resnet)
        low_ch = block_out_channels(self.resnet_layer1[-1])
        high_ch = block_out_channels(self.resnet_layer4[-1])
        self.ASPP = ASPP(high_ch, (6, 12, 18))
        self.project = nn.Sequential(*conv_bn_relu(low_ch, 48, 1))
        self.classifier = nn.Sequential(*conv_bn_relu(304, 256, 3), nn.Conv2d(256, num_classes, 1))
        self.representation = nn.Sequential(*conv_bn_relu(304, 256, 3), nn.Conv2d(256, output_dim, 1))

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] -> (logits [B,C,h,w], representation [B,D,h,w] or None), h = ceil(H/4) after the stem."""
        return self.decode(*self.encode(x), with_rep=with_rep)

    def decode(
        self, low: torch.Tensor, high: torch.Tensor, with_rep: bool = True, rep_rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(layer1, layer4 features) of N images -> (logits [N,C,h,w], representation or None).

        rep_rows: the representation of the first rep_rows images only (None: all).
        """
        low = self.project(low)
        high = resize_bilinear(self.ASPP(high), low.shape[-2:], align_corners=True)
        features = torch.cat([low, high], dim=1)
        return self.classifier(features), self.representation(features[:rep_rows]) if with_rep else None


class DeepLabv2Classifier(nn.Module):
    """ASPP-L of DeepLabv2: four dilated 3x3 convs (rates 6, 12, 18, 24) whose outputs are summed."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=rate, dilation=rate, bias=True) for rate in rates
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.conv2d_list]).sum(dim=0)


class DeepLabv2(_ResNetStem):
    """DeepLabv2 at output stride 8: forward -> (logits, rep), both from layer4 at stride 8."""

    def __init__(self, resnet: nn.Module, num_classes: int, output_dim: int = 256):
        super().__init__()
        self._adopt(resnet)
        high_ch = block_out_channels(self.resnet_layer4[-1])
        self.classifier = DeepLabv2Classifier(high_ch, num_classes)
        self.representation = nn.Sequential(nn.Conv2d(high_ch, output_dim, 1))

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] -> (logits [B,C,h,w], representation [B,D,h,w] or None) at stride 8."""
        _, high = self.encode(x)
        return self.classifier(high), self.representation(high) if with_rep else None

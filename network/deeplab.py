"""DeepLabv3+ and DeepLabv2 with a ReCo representation head (reco_behaviour.md sections 4.2 and 4.3).

forward(x, with_rep=False) skips the representation head (it is only needed by the ReCo loss) and returns
(logits, None). Module names are the reference's, so its published state_dicts load strictly (checkpoint_keys_*.json).
"""

from __future__ import annotations

import torch
from torch import nn

from helpers import UserError
from network.backbone import build_resnet
from network.resize import global_average, resize_bilinear

BACKBONES = ("deeplabv3p", "deeplabv2")


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    padding = dilation if kernel == 3 else 0
    return [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average, 1x1 conv, BN, ReLU, upsampled back to the input size."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, *layers = self
        y = global_average(x, pool)
        for layer in layers:
            y = layer(y)
        return resize_bilinear(y, x.shape[-2:], align_corners=False)


class ASPP(nn.Module):
    """1x1 branch, three atrous 3x3 branches and image pooling, concatenated and projected to 256 channels."""

    def __init__(self, in_ch: int, rates: tuple[int, int, int] = (6, 12, 18), out_ch: int = 256):
        super().__init__()
        branches = [nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 3, rate)) for rate in rates]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(out_ch * len(branches), out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class _ResNetStem(nn.Module):
    """Holds the backbone under the reference's attribute names (resnet_conv1 ... resnet_layer4)."""

    def _adopt(self, resnet: nn.Module) -> None:
        self.resnet_conv1, self.resnet_bn1 = resnet.conv1, resnet.bn1
        self.resnet_relu, self.resnet_maxpool = resnet.relu, resnet.maxpool
        self.resnet_layer1, self.resnet_layer2 = resnet.layer1, resnet.layer2
        self.resnet_layer3, self.resnet_layer4 = resnet.layer3, resnet.layer4

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] -> (layer1 output at stride 4, layer4 output)."""
        x = self.resnet_maxpool(self.resnet_relu(self.resnet_bn1(self.resnet_conv1(x))))
        low = self.resnet_layer1(x)
        return low, self.resnet_layer4(self.resnet_layer3(self.resnet_layer2(low)))


class DeepLabv3Plus(_ResNetStem):
    """DeepLabv3+ at output stride 16 with a layer1 decoder: forward -> (logits, rep), both at stride 4."""

    def __init__(self, resnet: nn.Module, num_classes: int, output_dim: int = 256):
        super().__init__()
        self._adopt(resnet)
        low_ch, high_ch = _out_channels(self.resnet_layer1), _out_channels(self.resnet_layer4)
        self.ASPP = ASPP(high_ch, (6, 12, 18))
        self.project = nn.Sequential(*_conv_bn_relu(low_ch, 48, 1))
        self.classifier = nn.Sequential(*_conv_bn_relu(304, 256, 3), nn.Conv2d(256, num_classes, 1))
        self.representation = nn.Sequential(*_conv_bn_relu(304, 256, 3), nn.Conv2d(256, output_dim, 1))

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] -> (logits [B,C,h,w], representation [B,D,h,w] or None), h = ceil(H/4) after the stem."""
        low, high = self._features(x)
        low = self.project(low)
        high = resize_bilinear(self.ASPP(high), low.shape[-2:], align_corners=True)
        features = torch.cat([low, high], dim=1)
        return self.classifier(features), self.representation(features) if with_rep else None


class DeepLabv2Classifier(nn.Module):
    """ASPP-L of DeepLabv2: four dilated 3x3 convs (rates 6, 12, 18, 24) whose outputs are summed."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=rate, dilation=rate, bias=True) for rate in rates)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.conv2d_list]).sum(dim=0)


class DeepLabv2(_ResNetStem):
    """DeepLabv2 at output stride 8: forward -> (logits, rep), both from layer4 at stride 8."""

    def __init__(self, resnet: nn.Module, num_classes: int, output_dim: int = 256):
        super().__init__()
        self._adopt(resnet)
        high_ch = _out_channels(self.resnet_layer4)
        self.classifier = DeepLabv2Classifier(high_ch, num_classes)
        self.representation = nn.Sequential(nn.Conv2d(high_ch, output_dim, 1))

    def forward(self, x: torch.Tensor, with_rep: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] -> (logits [B,C,h,w], representation [B,D,h,w] or None) at stride 8."""
        _, high = self._features(x)
        return self.classifier(high), self.representation(high) if with_rep else None


def _out_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage (BasicBlock: 64·2^k, Bottleneck: 4× that)."""
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def build_model(backbone: str = "deeplabv3p", num_classes: int = 21, output_dim: int = 256,
                resnet_depth: int = 101, pretrained: str = "none") -> nn.Module:
    """DeepLabv3+ (OS16) or DeepLabv2 (OS8) on a dilated ResNet; model(x) -> (logits, representation)."""
    if backbone == "deeplabv3p":
        return DeepLabv3Plus(build_resnet(resnet_depth, pretrained, dilations=(1, 2)), num_classes, output_dim)
    if backbone == "deeplabv2":
        return DeepLabv2(build_resnet(resnet_depth, pretrained, dilations=(2, 4)), num_classes, output_dim)
    raise UserError(f"--backbone {backbone!r} is not known: choose one of {', '.join(BACKBONES)}.")


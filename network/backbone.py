"""ResNet backbones and their weights: the dilated torchvision ResNet (dilation in place of the last strides)
with torchvision's ImageNet or local weights, and UniMatch's deep-stem ResNet with its authors' ImageNet
files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from helpers import UserError, read_torch_file

# depth -> (torchvision constructor name, weights enum name); IMAGENET1K_V1 is what the reference used.
_RESNETS = {
    18: ("resnet18", "ResNet18_Weights"),
    34: ("resnet34", "ResNet34_Weights"),
    50: ("resnet50", "ResNet50_Weights"),
    101: ("resnet101", "ResNet101_Weights"),
}
RESNET_DEPTHS = tuple(_RESNETS)


def dilate_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one, in place (the reference's no-stride-dilate rule).

    A stride-2 conv gets stride 1 and, if 3x3, dilation = padding = dilation // 2 (the first block's 3x3
    and its 1x1 downsample); every other 3x3 conv gets dilation = padding = dilation.
    """
    for module in layer.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        is_3x3 = module.kernel_size == (3, 3)
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if is_3x3:
                module.dilation = module.padding = (dilation // 2, dilation // 2)
        elif is_3x3:
            module.dilation = module.padding = (dilation, dilation)


def _check_depth(resnet_depth: int) -> None:
    if resnet_depth not in _RESNETS:
        raise UserError(
            f"--resnet_depth {resnet_depth} is not supported: choose one of "
            f"{', '.join(map(str, RESNET_DEPTHS))}."
        )


def imagenet_weight_file(resnet_depth: int) -> Path:
    """Where torch hub keeps torchvision's IMAGENET1K_V1 file for this depth."""
    _check_depth(resnet_depth)
    weights = getattr(torchvision.models, _RESNETS[resnet_depth][1]).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _imagenet_state_dict(resnet_depth: int) -> dict[str, torch.Tensor]:
    """Torchvision's ImageNet weights, downloaded into the torch hub cache when not there yet."""
    weights = getattr(torchvision.models, _RESNETS[resnet_depth][1]).IMAGENET1K_V1
    path = imagenet_weight_file(resnet_depth)
    if not path.is_file():
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a blocked network fails instead of hanging
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        except Exception as error:  # no network, proxy, disk: all end in the same instruction
            raise FileNotFoundError(
                f"cannot download the ImageNet ResNet-{resnet_depth} weights "
                f"({type(error).__name__}: {error}); "
                f"put {weights.url} at {path}, or pass --pretrained none or --pretrained PATH to a local "
                f"torchvision ResNet-{resnet_depth} state_dict."
            ) from None
        finally:
            socket.setdefaulttimeout(previous_timeout)
    return _read_weights(path, "delete it to download it again, or pass --pretrained none.")


def _read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A weights-only torch file holding a dict; errors name the file and the fix."""
    state = read_torch_file(path, "weights file", fix)
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state_dict; {fix}")
    return state


def _local_state_dict(
    path: str | os.PathLike, family: str = "a torchvision ResNet state_dict"
) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained {path}: no such file; pass 'imagenet', 'none' or the path of {family} (.pth)."
        )
    return _read_weights(path, f"pass {family} saved with torch.save (--pretrained PATH).")


def build_resnet(
    resnet_depth: int = 101, pretrained: str = "none", dilations: tuple[int, int] = (1, 2)
) -> nn.Module:
    """Torchvision ResNet with layer3/layer4 dilated by `dilations` (1 = keep the stride) and no fc.

    pretrained: 'imagenet' (torchvision IMAGENET1K_V1), 'none' (random init) or a path to a torchvision
    ResNet state_dict (its fc keys are ignored; every other key must match).
    """
    _check_depth(resnet_depth)
    resnet = getattr(torchvision.models, _RESNETS[resnet_depth][0])(weights=None)
    resnet.fc = nn.Identity()  # dropped by the model anyway; keeps the strict load below free of fc keys
    if pretrained != "none":
        source = f"ImageNet ResNet-{resnet_depth}" if pretrained == "imagenet" else str(pretrained)
        state = (
            _imagenet_state_dict(resnet_depth) if pretrained == "imagenet" else _local_state_dict(pretrained)
        )
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            resnet.load_state_dict(state, strict=True)
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            deep_stem = ""
            if "conv1.0.weight" in state:  # UniMatch's deep-stem file given to ReCo's network
                deep_stem = "; a deep-stem file needs --backbone deeplabv3p_unimatch"
            raise UserError(
                f"--pretrained {source}: does not fit a torchvision ResNet-{resnet_depth} backbone "
                f"({detail[:400]}); pass weights of the same depth as --resnet_depth "
                f"with torchvision key names (conv1.weight, layer1.0...){deep_stem}."
            ) from None
    for layer, dilation in zip((resnet.layer3, resnet.layer4), dilations):
        if dilation > 1:
            dilate_layer(layer, dilation)
    return resnet


# UniMatch's backbone files (resnet50.pth, resnet101.pth from its README) use these names for the deep stem.
_DEEP_STEM_FAMILY = "UniMatch's deep-stem ResNet (conv1.0/.1/.3/.4/.6, bn1, layer1-4)"


def _deep_stem(resnet: nn.Module) -> None:
    """Replace torchvision's 7x7 stem by three 3x3 convs (64-64-128, the first strided), in place.

    bn1 and layer1's first block then take 128 channels; a BasicBlock stage gets the 1x1 projection it needs.
    """

    def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
        layer = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        return layer

    resnet.conv1 = nn.Sequential(
        conv(3, 64, 3, 2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv(64, 64, 3),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv(64, 128, 3),
    )
    resnet.bn1 = nn.BatchNorm2d(128)
    first = resnet.layer1[0]
    first.conv1 = conv(128, first.conv1.out_channels, first.conv1.kernel_size[0])
    width = block_out_channels(first)
    first.downsample = nn.Sequential(conv(128, width, 1), nn.BatchNorm2d(width))


def block_out_channels(block: nn.Module) -> int:
    """Output channels of a ResNet block (Bottleneck: bn3, BasicBlock: bn2)."""
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def build_deep_stem_resnet(resnet_depth: int = 101, pretrained: str = "none") -> nn.Module:
    """UniMatch's ResNet: deep stem, layer4 dilated (output stride 16), no fc; its backbone files' key names.

    pretrained: 'none' or the path of UniMatch's ImageNet file for this depth (resnet50.pth, resnet101.pth; fc
    keys are ignored, every other key must match). Depths 18 and 34 have no such file (random init only).
    """
    _check_depth(resnet_depth)
    if pretrained == "imagenet":
        raise UserError(
            f"--pretrained imagenet: UniMatch's deep-stem ResNet-{resnet_depth} weights are not "
            f"downloadable here; download resnet{resnet_depth}.pth from UniMatch's README and "
            f"pass --pretrained PATH, or pass --pretrained none."
        )
    resnet = getattr(torchvision.models, _RESNETS[resnet_depth][0])(weights=None)
    resnet.fc = nn.Identity()  # UniMatch's ResNet has no classifier
    _deep_stem(resnet)
    dilate_layer(resnet.layer4, 2)  # replace_stride_with_dilation=[F, F, T], which BasicBlock lacks
    if pretrained != "none":
        state = _local_state_dict(pretrained, f"{_DEEP_STEM_FAMILY} state_dict such as its resnet50.pth")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            resnet.load_state_dict(state, strict=True)
        except RuntimeError:
            raise UserError(
                f"--pretrained {pretrained}: expected the keys of {_DEEP_STEM_FAMILY} at "
                f"depth {resnet_depth}, found {_describe_keys(state)}; pass UniMatch's "
                f"resnet50.pth or resnet101.pth with the matching --resnet_depth, or use "
                f"--backbone deeplabv3p for torchvision ResNet weights."
            ) from None
    return resnet


def _describe_keys(state: dict[str, torch.Tensor]) -> str:
    """The weight family a state_dict looks like, for error messages (a few of its keys otherwise)."""
    keys = list(state)
    if "conv1.weight" in state:
        return f"a 7x7-stem torchvision ResNet (conv1.weight {list(state['conv1.weight'].shape)})"
    if any(k.startswith(("resnet_", "module.resnet_")) for k in keys):
        return "a ReCo DeepLab checkpoint (resnet_conv1 ...)"
    if any(k.startswith(("backbone.", "module.backbone.")) for k in keys):
        return "a whole segmentation checkpoint (backbone.*), not a backbone file"
    if "conv1.0.weight" in state:
        return "a deep-stem ResNet of another depth or layout"
    return f"keys {', '.join(keys[:3]) or 'none'}"

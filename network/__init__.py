"""Backbones and heads: dilated torchvision ResNet, DeepLabv3+, DeepLabv2, UniMatch's DeepLabv3+, checkpoint
reading, and logits at label size."""

from network.backbone import RESNET_DEPTHS, build_deep_stem_resnet, build_resnet, imagenet_weight_file
from network.build import BACKBONES, build_model
from network.checkpoint import infer_config, load_model, load_state_dict, model_from_state_dict
from network.deeplab import DeepLabv2, DeepLabv3Plus
from network.inference import check_window, predict, upsample
from network.unimatch import UniMatchDeepLabv3Plus

__all__ = [
    "BACKBONES",
    "RESNET_DEPTHS",
    "DeepLabv2",
    "DeepLabv3Plus",
    "UniMatchDeepLabv3Plus",
    "build_deep_stem_resnet",
    "build_model",
    "build_resnet",
    "check_window",
    "imagenet_weight_file",
    "infer_config",
    "load_model",
    "load_state_dict",
    "model_from_state_dict",
    "predict",
    "upsample",
]

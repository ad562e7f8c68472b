"""Backbones and heads: dilated torchvision ResNet, DeepLabv3+, DeepLabv2, checkpoint reading, and logits at
label size."""

from network.backbone import RESNET_DEPTHS, build_resnet, imagenet_weight_file
from network.checkpoint import infer_config, load_model, load_state_dict, model_from_state_dict
from network.deeplab import BACKBONES, DeepLabv2, DeepLabv3Plus, build_model
from network.inference import check_window, predict, upsample

__all__ = ["BACKBONES", "RESNET_DEPTHS", "DeepLabv2", "DeepLabv3Plus", "build_model", "build_resnet", "check_window",
           "imagenet_weight_file", "infer_config", "load_model", "load_state_dict", "model_from_state_dict",
           "predict", "upsample"]

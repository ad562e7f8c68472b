"""Backbones and heads: dilated torchvision ResNet, DeepLabv3+, DeepLabv2, and logits at label size."""

from network.backbone import RESNET_DEPTHS, build_resnet, imagenet_weight_file, read_torch_file
from network.deeplab import BACKBONES, DeepLabv2, DeepLabv3Plus, build_model, infer_config, model_from_state_dict
from network.inference import predict, upsample

__all__ = ["BACKBONES", "RESNET_DEPTHS", "DeepLabv2", "DeepLabv3Plus", "build_model", "build_resnet",
           "imagenet_weight_file", "infer_config", "model_from_state_dict", "predict", "read_torch_file", "upsample"]

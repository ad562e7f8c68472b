"""Backbones and heads: dilated torchvision ResNet, DeepLabv3+, DeepLabv2."""

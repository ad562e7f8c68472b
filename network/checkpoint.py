"""Checkpoints: read any model file (ours, the reference's published .pth, a resume last.pth, UniMatch's
latest.pth / best.pth) and build the network it describes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from helpers import UserError, read_torch_file
from network.backbone import RESNET_DEPTHS
from network.build import build_model


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model state_dict from a reference .pth, our best .pth, our resume dict (its teacher if any) or a
    UniMatch checkpoint ({'model': ...} with DDP's 'module.' prefix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: pass the path of a .pth file "
            "(training writes them to --weights_dir, default model_weights/)"
        )
    state = read_torch_file(path, "checkpoint", "re-download or re-train it")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state.get("teacher") or state["model"]
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; pass a .pth file "
            "written by the training scripts or the reference's published weights"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


# Blocks in layer3 -> depth, per block type (torchvision: 18/34 BasicBlock, 50/101 Bottleneck).
_LAYER3_BLOCKS = {("basic", 2): 18, ("basic", 6): 34, ("bottleneck", 6): 50, ("bottleneck", 23): 101}


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, object]:
    """Read backbone, resnet_depth, num_classes and output_dim off a model state_dict (ours, the reference's
    or UniMatch's, whose missing representation head gets the default output_dim 256)."""
    if "classifier.conv2d_list.0.weight" in state_dict:
        backbone, classifier, representation = (
            "deeplabv2",
            "classifier.conv2d_list.0.weight",
            "representation.0.weight",
        )
    elif "classifier.3.weight" in state_dict:
        backbone, classifier, representation = "deeplabv3p", "classifier.3.weight", "representation.3.weight"
    elif "fuse.0.weight" in state_dict and "classifier.weight" in state_dict:
        backbone, classifier = "deeplabv3p_unimatch", "classifier.weight"
        representation = "representation.3.weight"
    else:
        raise UserError(
            "the checkpoint is not a DeepLabv3+/DeepLabv2 state_dict (no classifier.3.weight, "
            "classifier.conv2d_list.0.weight or fuse.0.weight key); pass a file written by the "
            "training scripts or by UniMatch."
        )
    resnet = "backbone." if backbone == "deeplabv3p_unimatch" else "resnet_"
    kind = "bottleneck" if f"{resnet}layer1.0.conv3.weight" in state_dict else "basic"
    layer3 = f"{resnet}layer3."
    blocks = len({key[len(layer3) :].split(".")[0] for key in state_dict if key.startswith(layer3)})
    depth = _LAYER3_BLOCKS.get((kind, blocks))
    if depth is None:
        raise UserError(
            f"the checkpoint's ResNet ({blocks} {kind} blocks in layer3) is none of depths "
            f"{', '.join(map(str, RESNET_DEPTHS))}."
        )
    output_dim = state_dict[representation].shape[0] if representation in state_dict else 256
    return {
        "backbone": backbone,
        "resnet_depth": depth,
        "num_classes": state_dict[classifier].shape[0],
        "output_dim": output_dim,
    }


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    source: str = "the checkpoint",
    num_classes: int | None = None,
    backbone: str | None = None,
    resnet_depth: int | None = None,
    output_dim: int | None = None,
) -> nn.Module:
    """Build the network a state_dict was saved from and load it strictly; flags left None are read from it.

    source names the file in errors; num_classes, if given, must match the checkpoint's (the dataset's).
    """
    found = infer_config(state_dict)
    for flag, value in (("backbone", backbone), ("resnet_depth", resnet_depth), ("output_dim", output_dim)):
        if value is not None and value != found[flag]:
            raise UserError(
                f"--{flag} {value} does not match {source} ({flag} {found[flag]}); "
                f"drop the flag or pass the right checkpoint"
            )
    if num_classes is not None and found["num_classes"] != num_classes:
        raise UserError(
            f"{source} predicts {found['num_classes']} classes but the dataset has {num_classes}; "
            f"pass a checkpoint trained on this --dataset (for --dataset folder: on the classes "
            f"of its classes.txt)"
        )
    model = build_model(found["backbone"], found["num_classes"], found["output_dim"], found["resnet_depth"])
    if not any(key.startswith("representation.") for key in state_dict):  # UniMatch's files: keep ours
        state_dict = {
            **{k: v for k, v in model.state_dict().items() if k.startswith("representation.")},
            **state_dict,
        }
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise UserError(
            f"{source} does not fit a {found['backbone']} ResNet-{found['resnet_depth']} model "
            f"({detail[:400]}); pass a file written by the training scripts"
        ) from None
    return model


def load_model(
    path: str | os.PathLike,
    num_classes: int | None = None,
    backbone: str | None = None,
    resnet_depth: int | None = None,
    output_dim: int | None = None,
) -> nn.Module:
    """The network a checkpoint file describes, with its weights (strict); flags left None are read."""
    return model_from_state_dict(
        load_state_dict(path), f"checkpoint {path}", num_classes, backbone, resnet_depth, output_dim
    )

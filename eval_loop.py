"""Evaluation as the reference: one confusion matrix over every (padded) test image, single scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from distributed import all_reduce_sum
from helpers import autocast_for
from module_list import ConfMatrix, compute_supervised_loss
from network import predict


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    device: torch.device,
    amp: str = "off",
    flip: bool = False,
    window: Sequence[int] | None = None,
    progress: bool = False,
) -> dict:
    """Whole-set evaluation as the reference: one confusion matrix over every (padded) image, single scale."""
    model.eval()
    conf = ConfMatrix(num_classes, device)
    loss_sum = torch.zeros(2, device=device)  # (sum of batch losses, number of batches)
    with autocast_for(device, amp)():
        for images, labels in tqdm(
            loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True
        ):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = predict(model, images, labels.shape[-2:], flip=flip, window=window).float()
            valid = (labels >= 0).any()
            # batches with no valid pixel add no loss (the reference would add NaN)
            loss_sum += torch.stack(
                [torch.where(valid, compute_supervised_loss(logits, labels).nan_to_num(), 0.0), valid.float()]
            )
            conf.update(logits.argmax(1), labels)
    conf.reduce_from_all_processes()
    loss_sum = all_reduce_sum(loss_sum)
    miou, acc = conf.get_metrics()
    return {
        "loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),
        "miou": miou,
        "acc": acc,
        "iou_per_class": conf.iou_per_class(),
    }

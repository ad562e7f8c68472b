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
    per_image: bool = False,
) -> dict:
    """Whole-set evaluation as the reference: one confusion matrix over every (padded) image, single scale.
    per_image (one process): also each image's confusion matrix, [N, C, C] on the CPU, in the loader's
    order."""
    model.eval()
    conf = ConfMatrix(num_classes, device)
    images_conf = []
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
            if per_image:
                images_conf.append(per_image_confusion(logits.argmax(1), labels, num_classes))
    conf.reduce_from_all_processes()
    loss_sum = all_reduce_sum(loss_sum)
    miou, acc = conf.get_metrics()
    return {
        "loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),
        "miou": miou,
        "acc": acc,
        "iou_per_class": conf.iou_per_class(),
        **({"per_image_confusion": torch.cat(images_conf).cpu()} if per_image else {}),
    }


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each image's confusion matrix [B, C, C] int64 (rows ground truth, columns prediction) of pred and
    target [B, H, W]; targets outside 0..C-1 are ignored, as in ConfMatrix. One bincount, no host sync."""
    b, c = target.shape[0], num_classes
    keep = (target >= 0) & (target < c)
    image = torch.arange(b, device=target.device).view(b, 1, 1)
    index = torch.where(keep, (image * c + target) * c + pred, 0)
    counts = torch.zeros(b * c * c, dtype=torch.int64, device=target.device)
    return counts.index_add_(0, index.reshape(-1), keep.reshape(-1).long()).view(b, c, c)

"""Evaluation-time prediction: full-image logits at label size, with optional flip and sliding window."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from helpers import UserError, full_precision
from network.resize import resize_bilinear


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W] float32 (float64 kept), bilinear, align_corners=True (the reference's)."""
    return resize_bilinear(full_precision(logits), size, align_corners=True)


def check_window(window: Sequence[int] | None) -> None:
    """--window is None or two positive sizes H W; UserError naming the flag otherwise."""
    if window is not None and (len(window) != 2 or min(window) < 1):
        raise UserError(f"--window must be two positive sizes H W, got {list(window)}")


def _upsampled_logits(model: nn.Module, images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return upsample(model(images, with_rep=False)[0], size)  # no ReCo at inference: skip the head


def _window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows of `window` px over `length` px, 1/3 overlap, the last flush with the end."""
    if window >= length:
        return [0]
    stride = math.ceil(window * 2 / 3)
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def _sliding_logits(model: nn.Module, images: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Average of the per-window logits (each upsampled to its window) over [B,3,H,W] -> [B,C,H,W]."""
    height, width = images.shape[-2:]
    win_h, win_w = min(window[0], height), min(window[1], width)
    total, count = None, images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, win_h):
        for left in _window_starts(width, win_w):
            # a strided view runs the convolutions several times slower (seen on CPU and GPU)
            crop = images[:, :, top : top + win_h, left : left + win_w].contiguous()
            logits = _upsampled_logits(model, crop, (win_h, win_w))
            if total is None:
                total = logits.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[:, :, top : top + win_h, left : left + win_w] += logits
            count[:, :, top : top + win_h, left : left + win_w] += 1
    return total / count


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    flip: bool = False,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits [B,C,*out_size] for images [B,3,H,W], upsampled bilinearly with align_corners=True.

    flip: average with the horizontally flipped pass. window (h, w): slide a window of that size over the
    image with 1/3 overlap and average the logits where windows overlap. The model should be in eval mode.
    """
    out_size = tuple(int(s) for s in out_size)
    check_window(window)

    def one_pass(x: torch.Tensor) -> torch.Tensor:
        if window is None:
            return _upsampled_logits(model, x, out_size)
        logits = _sliding_logits(model, x, window)
        if logits.shape[-2:] == out_size:
            return logits
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True)

    logits = one_pass(images)
    if flip:
        logits = (logits + one_pass(images.flip(-1)).flip(-1)) / 2
    return logits

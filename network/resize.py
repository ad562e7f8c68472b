"""Bilinear resizing and global pooling whose backward is deterministic where torch's is not: CUDA's kernels
for both add gradients with atomics, and raise under torch.use_deterministic_algorithms (--deterministic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def exact_backward_needed(x: torch.Tensor) -> bool:
    """Whether x's gradient must avoid CUDA's atomic-add kernels: deterministic mode, CUDA, gradients."""
    return x.requires_grad and x.is_cuda and torch.are_deterministic_algorithms_enabled()


def _bilinear_matrix(size_in: int, size_out: int, align_corners: bool, device: torch.device) -> torch.Tensor:
    """[size_out, size_in] fp32: each output position's two input weights, as F.interpolate places them."""
    out = torch.arange(size_out, device=device, dtype=torch.float32)
    if align_corners:
        source = out * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:  # pixel centres, clamped at the first one (torch's area_pixel_compute_source_index)
        source = ((out + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = source.floor().clamp(max=size_in - 1)
    frac = source - low
    high = (low + 1).clamp(max=size_in - 1)  # at the last input both weights fall on it
    columns = torch.arange(size_in, device=device, dtype=torch.float32)
    return (columns == low[:, None]) * (1 - frac)[:, None] + (columns == high[:, None]) * frac[:, None]


def resize_bilinear(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W], F.interpolate's bilinear; as two matrix products (whose backward is two
    more) where exact_backward_needed(x), the same values up to rounding."""
    if not exact_backward_needed(x):
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
    (height_in, width_in), (height, width) = x.shape[-2:], size
    rows = _bilinear_matrix(height_in, height, align_corners, x.device)  # [H, h]
    columns = _bilinear_matrix(width_in, width, align_corners, x.device)  # [W, w]
    with torch.autocast(x.device.type, enabled=False):  # fp32 weights and sums, as torch's kernel
        return (rows @ x.float() @ columns.t()).to(x.dtype)


def global_average(x: torch.Tensor, pool: torch.nn.Module) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 1, 1] by `pool` (AdaptiveAvgPool2d(1)), or a mean if exact_backward_needed."""
    return x.mean((2, 3), keepdim=True) if exact_backward_needed(x) else pool(x)


def pooled_branch(x: torch.Tensor, branch: torch.nn.Sequential, align_corners: bool) -> torch.Tensor:
    """ASPP's image-pooling branch: `branch` (an AdaptiveAvgPool2d(1), then layers) on x, spread
    bilinearly back over x's size; the average and the spread by global_average and resize_bilinear."""
    pool, *layers = branch
    y = global_average(x, pool)
    for layer in layers:
        y = layer(y)
    return resize_bilinear(y, x.shape[-2:], align_corners=align_corners)

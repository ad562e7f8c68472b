"""Joint image/label transforms as batched tensor functions: the loader workers (one sample, CPU) and the
unlabelled branch on the training device (a whole batch) run the same code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from module_list import IGNORE_INDEX

# ImageNet statistics used to normalise every image.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_JITTER_P, _BLUR_P, _FLIP_P = 0.8, 0.5, 0.5
_JITTER_RANGE = (0.75, 1.25)
# The colour jitter's largest hue rotation, in turns: the reference's and UniMatch's. --hue_jitter sets it
# per run: data whose classes are told apart by colour want a smaller one (0 keeps every hue).
HUE_JITTER = 0.25
_SIGMA_RANGE, _BLUR_RADIUS = (0.15, 1.15), 4  # kernel radius covers 3 sigma of the largest sigma
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ImageNet-normalised."""
    # per-channel Python scalars: no host-to-device copy (a sync) on a GPU
    return torch.stack([(c - m) / s for c, m, s in zip(images.unbind(-3), MEAN, STD)], dim=-3)


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [..., 3, H, W] -> [0, 1]."""
    return torch.stack([c * s + m for c, m, s in zip(images.unbind(-3), MEAN, STD)], dim=-3)


@dataclass
class AugmentParams:
    """Per-sample random draws of one transform call, each a tensor [B] (order: [B, 4] jitter op order)."""

    scale: torch.Tensor
    offset_u: torch.Tensor  # [B, 2] uniforms that pick the crop offset (y, x)
    jitter: torch.Tensor
    factors: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue
    order: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    flip: torch.Tensor


def sample_params(
    batch: int,
    scale_range: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    hue: float = HUE_JITTER,
) -> AugmentParams:
    """Draw every random number of one transform call at once, so a sample depends on the RNG state only.

    hue: the largest hue rotation; it scales a draw, so every hue draws the same random numbers."""
    u = torch.rand(batch, 15, generator=generator, device=device, dtype=torch.float64)

    def uniform(column: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * column

    factors = torch.cat([uniform(u[:, 4:7], *_JITTER_RANGE), uniform(u[:, 7:8], -hue, hue)], dim=1)
    return AugmentParams(
        scale=uniform(u[:, 0], *scale_range),
        offset_u=u[:, 1:3],
        jitter=u[:, 3] < _JITTER_P,
        factors=factors.float(),
        order=u[:, 8:12].argsort(dim=1),
        blur=u[:, 12] < _BLUR_P,
        sigma=uniform(u[:, 13], *_SIGMA_RANGE).float(),
        flip=u[:, 14] < _FLIP_P,
    )


def _axis_indices(
    in_len: int,
    size: torch.Tensor,
    crop: int,
    offset: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    compact: bool = False,
):
    """Source indices and weights along one axis: resize to size [B] -> pad at the end -> crop at offset [B].

    Returns valid [B, crop] (inside the rescaled image, not padding), nearest [B, crop] source indices, and
    the image resize as weights, taps, index: PIL's BILINEAR filter, a triangle whose support widens by the
    shrink factor (antialiasing; plain bilinear when enlarging), centred at (i + 0.5) * in / out, its taps
    clipped to the image and normalised per output position. Padding positions take the weights of their
    reflected (edge not repeated) position. offset None places the crop at offset 0.

    compact False (sync-free, for GPUs): weights [B, crop, in_len], a dense matrix; taps and index None.
    compact True (reads values on the host, for CPU tensors): only the L distinct reflected positions, each
    with its K nonzero taps: weights [B, L, K] of source pixels taps [B, L, K]; index [B, crop] (or None when
    L = crop) picks each crop position's row.
    """
    size = size[:, None]  # rescaled length [B, 1]
    offset = torch.zeros_like(size) if offset is None else offset[:, None]
    pos = torch.arange(crop, device=size.device)[None] + offset  # position in the padded, rescaled axis
    valid = pos < size
    period = (2 * (size - 1)).clamp(min=1)  # repeated reflection when the pad exceeds the image
    folded = pos % period
    folded = torch.where(folded > size - 1, period - folded, folded)
    ratio = in_len / size.to(torch.float32)
    nearest = ((torch.minimum(pos, size - 1).float() + 0.5) * ratio).long().clamp(max=in_len - 1)
    rows, index = folded, None
    if compact:  # the reflected positions of a contiguous crop form a contiguous range: resample it once
        first, last = int(folded.min()), int(folded.max())
        if last - first + 1 < crop:
            rows = torch.minimum(torch.arange(first, last + 1, device=size.device)[None], size - 1)
            index = folded - first
    # the weights in float64 (small); at scale 1 each row is exactly one 1 and zeros
    ratio = in_len / size.to(torch.float64)
    centre = (rows.to(torch.float64) + 0.5) * ratio  # in source pixel units
    support = ratio.clamp(min=1)  # the triangle's half width, in source pixels
    if compact:  # a window from the first pixel j with |j + 0.5 - centre| < support (PIL's xmin), long enough
        start = (centre - support + 0.5).floor().clamp(min=0)
        pixels = start[..., None] + torch.arange(int(2 * support.max()) + 2, device=size.device)
    else:  # all pixels: a dense matrix
        pixels = torch.arange(in_len, device=size.device, dtype=torch.float64).expand(*centre.shape, in_len)
    # in place with reciprocals: broadcast divisions of float64 are slow on a CPU
    weights = (
        (pixels + 0.5 - centre[..., None]).abs_().mul_((1 / support)[..., None]).neg_().add_(1).clamp_(min=0)
    )
    if compact:
        weights.masked_fill_(pixels >= in_len, 0)  # taps clipped to the image
    weights.mul_(
        1 / weights.sum(dim=-1, keepdim=True)
    )  # the sum is never 0: the nearest tap is within 1/2 pixel
    if not compact:
        return valid, nearest, weights.to(dtype), None, None
    # keep the window from the first tap any row needs to the last one any row needs
    nonzero = (weights > 0).any(dim=0).any(dim=0).nonzero()[:, 0]
    first, last = int(nonzero[0]), int(nonzero[-1])
    taps = pixels[..., first : last + 1].long().clamp(max=in_len - 1)
    return valid, nearest, weights[..., first : last + 1].to(dtype), taps, index


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Per-sample gather along dim 2 (rows) or 3 (cols) of x [B, C, H, W] with index [B, L]."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = (index.shape[0], 1, -1, 1) if dim == 2 else (index.shape[0], 1, 1, -1)
    return x.gather(dim, index.view(view).expand(shape))


def _taps_resample(image, w_y, taps_y, index_y, w_x, taps_x, index_x):
    """One image [C, H, W] -> [C, crop_h, crop_w]: each output row (then column) the weighted sum of its K
    taps (weights [L, K] of source pixels taps [L, K]), summed in tap order, elementwise; then index
    [crop] (or None) picks each crop position's row (column). Works on [H, W, C]: whole rows move at once."""
    (rows_out, k_y), (cols_out, k_x) = taps_y.shape, taps_x.shape
    picked = image.permute(1, 2, 0).index_select(0, taps_y.flatten()).unflatten(0, (rows_out, k_y))
    rows = sum(w_y[:, k, None, None] * picked[:, k] for k in range(k_y))  # [L_y, W, C]
    picked = rows.transpose(0, 1).index_select(0, taps_x.flatten()).unflatten(0, (cols_out, k_x))
    out = sum(w_x[:, k, None, None] * picked[:, k] for k in range(k_x))  # [L_x, L_y, C]
    if index_x is not None:
        out = out.index_select(0, index_x)
    if index_y is not None:
        out = out.index_select(1, index_y)
    return out.permute(2, 1, 0).contiguous()


def _resample(images, labels, conf, crop_size, scale, offset_u, compact: bool | None = None):
    """resize_pad_crop at per-sample scales [B] (sizes truncated), crop offsets drawn from uniforms [B, 2]."""
    sizes = [(n * scale).floor().long().clamp(min=1) for n in images.shape[2:]]
    offsets = None
    if offset_u is not None:  # uniform over 0..padded-crop, as RandomCrop
        spans = [size.clamp(min=crop) - crop + 1 for size, crop in zip(sizes, crop_size)]
        offsets = [
            torch.minimum((u * span).floor().long(), span - 1) for u, span in zip(offset_u.unbind(1), spans)
        ]
    return resize_pad_crop(images, labels, conf, crop_size, sizes, offsets, compact)


def resize_pad_crop(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    conf: torch.Tensor | None,
    crop_size: tuple[int, int],
    sizes: list[torch.Tensor],
    offsets: list[torch.Tensor] | None,
    compact: bool | None = None,
):
    """Resize each sample to sizes (heights [B], widths [B]), pad at the end (image reflect, label ignore,
    conf 0) and crop crop_size at offsets (tops [B], lefts [B]; None: 0). Returns images, labels, conf.

    Images: separable per-sample weights, antialiased as PIL's BILINEAR resize, over the crop's rows and
    columns only: images = Wy @ x @ Wx^T with dense matrices (compact False, sync-free: GPUs), or as weighted
    sums of the K nonzero taps of each distinct reflected position (compact True, the default on CPU tensors,
    where reading sizes on the host costs no sync: fewer operations, and elementwise, so the result does not
    depend on the number of threads). Labels and conf: nearest, so their values survive exactly.
    """
    (_, _, height, width), (crop_h, crop_w) = images.shape, crop_size
    compact = images.device.type == "cpu" if compact is None else compact
    top, left = (None, None) if offsets is None else offsets
    valid_y, near_y, w_y, taps_y, index_y = _axis_indices(
        height, sizes[0], crop_h, top, images.dtype, compact
    )
    valid_x, near_x, w_x, taps_x, index_x = _axis_indices(
        width, sizes[1], crop_w, left, images.dtype, compact
    )
    if compact:  # per sample: index_select is much faster than gather on a CPU
        no_index = [None] * images.shape[0]
        images = torch.stack(
            [
                _taps_resample(*args)
                for args in zip(
                    images,
                    w_y,
                    taps_y,
                    no_index if index_y is None else index_y,
                    w_x,
                    taps_x,
                    no_index if index_x is None else index_x,
                )
            ]
        )
    else:
        w_y, w_xt = w_y[:, None], w_x.transpose(1, 2)[:, None]  # [B, 1, crop_h, H], [B, 1, W, crop_w]
        # the cheaper order of the two passes (shapes only: no sync)
        if crop_h * width * (height + crop_w) <= crop_w * height * (width + crop_h):
            images = torch.matmul(torch.matmul(w_y, images), w_xt)
        else:
            images = torch.matmul(w_y, torch.matmul(images, w_xt))
    inside = valid_y[:, :, None] & valid_x[:, None, :]

    def nearest(x: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        if x is None:
            return None
        x = _take(_take(x[:, None], 2, near_y), 3, near_x)[:, 0]
        return torch.where(inside, x, torch.full((), fill, dtype=x.dtype, device=x.device))

    return images, nearest(labels, IGNORE_INDEX), nearest(conf, 0.0)


def luma(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W] (the weights of torchvision's rgb_to_grayscale)."""
    r, g, b = images.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b)[:, None]


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [B, 3, H, W] images in [0, 1] by shift [B] (in turns)."""
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    r, g, b = images.unbind(1)
    safe = chroma.clamp(min=1e-12)
    sextant = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = (sextant / 6 + shift.view(-1, 1, 1)) % 1.0
    k = torch.stack([(n + 6 * hue) % 6 for n in (5.0, 3.0, 1.0)], dim=1)  # per output channel R, G, B
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def colour_jitter(
    images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on [B, 3, H, W] in [0, 1], per sample in its own order.

    apply [B] bool, factors [B, 4], order [B, 4] (a permutation of 0..3 per sample). In each of the 4 order
    slots every sample runs the op it picked; the others get a neutral factor, which leaves them unchanged.
    """
    neutral = torch.ones_like(factors[:, 0])
    for slot in range(4):
        op = order[:, slot]
        factor = factors.gather(1, op[:, None])[:, 0]
        # brightness, contrast and saturation all blend with an anchor: black, mean grey, per-pixel grey
        blend = torch.where(apply & (op < 3), factor, neutral).view(-1, 1, 1, 1)
        gray = luma(images)
        op4 = op.view(-1, 1, 1, 1)
        anchor = torch.where(op4 == 2, gray, torch.where(op4 == 1, gray.mean(dim=(2, 3), keepdim=True), 0.0))
        images = (blend * images + (1 - blend) * anchor).clamp(0, 1)
        hue = apply & (op == 3)
        if images.device.type != "cpu" or hue.any():  # skipping is free to decide on a CPU, a sync on a GPU
            images = torch.where(
                hue.view(-1, 1, 1, 1), shift_hue(images, torch.where(hue, factor, 0.0)), images
            )
    return images


def separable_blur(images: torch.Tensor, apply: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter [B, C, H, W] along columns then rows with a per-sample normalised kernel [B, 2r + 1], edges
    replicated, where apply [B]; others pass through exactly."""
    height, width, r = images.shape[2], images.shape[3], kernel.shape[1] // 2
    taps = torch.arange(-r, r + 1, device=images.device)
    # a skipped sample gets the identity kernel (1 at the centre, exact zeros elsewhere)
    kernel = torch.where(apply[:, None], kernel.to(images.dtype), (taps == 0).to(images.dtype))
    kernel = kernel.view(-1, 1, 1, 1, 2 * r + 1)
    # weighted sums of shifted slices (faster than a grouped conv for one sample on a CPU)
    x = F.pad(images, (0, 0, r, r), mode="replicate")
    x = sum(kernel[..., i] * x[:, :, i : i + height] for i in range(2 * r + 1))
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    return sum(kernel[..., i] * x[..., i : i + width] for i in range(2 * r + 1))


def gaussian_blur(images: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur [B, C, H, W] with a per-sample Gaussian of std sigma [B] where apply [B]; others pass through
    exactly."""
    taps = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    return separable_blur(images, apply, kernel / kernel.sum(dim=1, keepdim=True))


def random_transform(
    images: torch.Tensor,
    labels: torch.Tensor,
    conf: torch.Tensor | None,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    augmentation: bool,
    generator: torch.Generator | None = None,
    hue: float = HUE_JITTER,
):
    """The reference's joint train transform on [0, 1] images [B, 3, H, W], labels [B, H, W] long and conf.

    Rescale -> pad -> random crop, then (augmentation) colour jitter, blur and flip. Labels and conf use
    nearest sampling only, so their values survive exactly; pads are ignore / 0. hue: the jitter's largest
    hue rotation. Returns the same three.
    """
    params = sample_params(images.shape[0], scale_range, generator, images.device, hue)
    images, labels, conf = _resample(images, labels, conf, crop_size, params.scale, params.offset_u)
    if augmentation:
        images = colour_jitter(images, params.jitter, params.factors, params.order)
        images = gaussian_blur(images, params.blur, params.sigma)
        flip = params.flip.view(-1, 1, 1)
        images = torch.where(flip[:, None], images.flip(-1), images)
        labels = torch.where(flip, labels.flip(-1), labels)
        conf = None if conf is None else torch.where(flip, conf.flip(-1), conf)
    return images, labels, conf


def batch_transform(
    images: torch.Tensor,
    labels: torch.Tensor,
    conf: torch.Tensor | None,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    augmentation: bool,
    generator: torch.Generator | None = None,
    hue: float = HUE_JITTER,
):
    """Re-augment a normalised batch on its own device: images [B, 3, H, W], labels and conf [B, H, W]."""
    images, labels, conf = random_transform(
        denormalise(images), labels, conf, crop_size, scale_range, augmentation, generator, hue
    )
    return normalise(images), labels, conf


def pad_to(images: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]):
    """The eval path: pad (image reflect, label ignore) or cut to size at offset (0, 0); no randomness."""
    ones = torch.ones(images.shape[0], device=images.device, dtype=torch.float64)
    images, labels, _ = _resample(images, labels, None, size, ones, None)
    return images, labels

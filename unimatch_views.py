"""The training views of UniMatch and FixMatch (Yang et al., CVPR 2023): the geometry of each crop in the
loader's workers, and on the training device the two strong colour views of an unlabelled crop and their
CutMix boxes. Draws follow the authors' distributions; the RNG calls are ours."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transforms import HUE_JITTER, colour_jitter, luma, normalise, resize_pad_crop, separable_blur

PADDING = 255  # the ignore mask's value on padded pixels (0 elsewhere), the authors' convention
_RESIZE_RANGE = (0.5, 2.0)  # of the long side
_FLIP_P, _JITTER_P, _GRAY_P, _BLUR_P, _BOX_P = 0.5, 0.8, 0.2, 0.5, 0.5
_JITTER_RANGE, _SIGMA_RANGE = (0.5, 1.5), (0.1, 2.0)  # the hue's: transforms.HUE_JITTER
_BLUR_PASSES, _BOX_BLUR_REACH = 3, 2  # Pillow's box passes; each reaches 2 pixels for sigma < 2.45
_BOX_AREA, _BOX_RATIO = (0.02, 0.4), (0.3, 1 / 0.3)  # of S^2; h / w, uniform
_BOX_TRIES = 512  # candidates per CutMix box: see cutmix_boxes


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


# --- geometry, one sample at a time in the loader's workers -----------------------------------


@dataclass(frozen=True)
class Geometry:
    """One crop's draws: the resized height and width, the window's corner in the padded image, the flip."""

    height: int
    width: int
    top: int
    left: int
    flip: bool


def draw_geometry(height: int, width: int, crop: int, generator: torch.Generator) -> Geometry:
    """The authors' draws for an image of height x width and a square crop: the long side resized to a uniform
    integer in [int(0.5 L), int(2 L)], the short side in proportion (rounded), a uniform crop window in the
    image padded (right and bottom) to crop, a horizontal flip with p 0.5."""

    def randint(low: int, high: int) -> int:  # both ends included
        return int(torch.randint(low, high + 1, (), generator=generator))

    longest, shortest = max(height, width), min(height, width)
    new_long = randint(max(1, int(longest * _RESIZE_RANGE[0])), int(longest * _RESIZE_RANGE[1]))
    new_short = max(1, int(shortest * new_long / longest + 0.5))  # >= 1: a thin sliver could round to 0
    new_h, new_w = (new_long, new_short) if height > width else (new_short, new_long)
    left = randint(0, max(new_w, crop) - crop)
    top = randint(0, max(new_h, crop) - crop)
    flip = bool(torch.rand((), generator=generator) < _FLIP_P)
    return Geometry(new_h, new_w, top, left, flip)


def apply_geometry(image: torch.Tensor, label: torch.Tensor | None, crop: int, geometry: Geometry):
    """Resize (image: PIL-like antialiased bilinear, label: nearest at pixel centres), pad, crop, flip.

    image float [3, H, W] in [0, 1], label long [H, W] or None -> image [3, S, S] with 0 (black) on padding,
    label [S, S] with IGNORE_INDEX on padding (or None), padding bool [S, S].
    """
    g, device = geometry, image.device
    sizes = [torch.tensor([g.height], device=device), torch.tensor([g.width], device=device)]
    offsets = [torch.tensor([g.top], device=device), torch.tensor([g.left], device=device)]
    image, label, _ = resize_pad_crop(
        image[None], None if label is None else label[None], None, (crop, crop), sizes, offsets
    )
    rows, cols = torch.arange(crop, device=device) + g.top, torch.arange(crop, device=device) + g.left
    padding = (rows[:, None] >= g.height) | (cols[None] >= g.width)
    image = image[0].masked_fill(padding, 0.0)  # the authors pad with black before normalising
    label = None if label is None else label[0]
    if g.flip:
        image, padding = image.flip(-1), padding.flip(-1)
        label = None if label is None else label.flip(-1)
    return image, label, padding


def labelled_crop(
    image: torch.Tensor, label: torch.Tensor, crop: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled training pair: image float [3, H, W] in [0, 1], label long [H, W] -> normalised image
    [3, S, S] (no colour augmentation) and label [S, S] with IGNORE_INDEX on padding."""
    image, label, _ = apply_geometry(image, label, crop, draw_geometry(*label.shape, crop, generator))
    return normalise(image), label


def unlabelled_crops(image: torch.Tensor, label: torch.Tensor, crop: int, generator: torch.Generator):
    """Two independent crops of one unlabelled image float [3, H, W] in [0, 1] with its label long [H, W]:
    (weak, padding, label) for the unlabelled batch, then (weak, padding) for the mix batch; weak float
    [3, S, S] in [0, 1], not normalised (the strong views start from it on the device), padding bool [S, S],
    label [S, S] with IGNORE_INDEX on padding (it only monitors the pseudo-labels).

    The authors' mix batch is a second pass over the unlabelled list in the same order, so the same images in
    crops of their own: this keeps that distribution.
    """
    height, width = image.shape[1:]
    first, second = (
        apply_geometry(image, label, crop, draw_geometry(height, width, crop, generator)) for _ in range(2)
    )
    return first[0], first[2], first[1], second[0], second[2]


# --- strong views and CutMix boxes, a whole batch on the training device ---------------------


@dataclass
class StrongParams:
    """The per-sample draws of one strong view, each [B] (factors [B, 4]: brightness, contrast, saturation,
    hue; order [B, 4]: a permutation of those four ops)."""

    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


def sample_strong_params(
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    hue: float = HUE_JITTER,
) -> StrongParams:
    """Colour jitter (0.5, 0.5, 0.5, hue) with p 0.8 in a random order, grayscale p 0.2, blur p 0.5 with
    sigma U(0.1, 2.0): every draw of a batch at once (the same ones whatever the hue)."""
    u = torch.rand(batch, 12, generator=generator, device=device, dtype=torch.float64)
    factors = torch.cat([_uniform(u[:, 1:4], *_JITTER_RANGE), _uniform(u[:, 4:5], -hue, hue)], dim=1)
    return StrongParams(
        jitter=u[:, 0] < _JITTER_P,
        factors=factors.float(),
        order=u[:, 5:9].argsort(dim=1),
        gray=u[:, 9] < _GRAY_P,
        blur=u[:, 10] < _BLUR_P,
        sigma=_uniform(u[:, 11], *_SIGMA_RANGE).float(),
    )


def strong_view(images: torch.Tensor, params: StrongParams) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> its strong view in [0, 1]: jitter, grayscale (3 channels kept), blur.

    Jitter and grayscale follow torchvision's tensor path (the authors run its PIL path on uint8 images);
    the blur is Pillow's GaussianBlur (see pillow_box), in floating point.
    """
    images = colour_jitter(images, params.jitter, params.factors, params.order)
    images = torch.where(params.gray.view(-1, 1, 1, 1), luma(images).expand_as(images), images)
    box = pillow_box(params.sigma)
    for _ in range(_BLUR_PASSES):  # each pass replicates its own input's edges, as Pillow's
        images = separable_blur(images, params.blur, box)
    return images


def pillow_box(sigma: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 5]: one pass of Pillow's GaussianBlur(radius=sigma), a box of fractional radius l + a
    (weight 1 inside, a on the two ends) whose variance is sigma^2 / 3; three passes along each axis blur.

    A Gaussian sampled at integer taps would be much weaker for sigma < 0.5 (variance 0.008, not 0.09, at
    sigma 0.3), and one wide kernel with replicated edges differs from three passes by up to 40 grey levels
    next to a high-contrast border. Left: Pillow rounds each pass to uint8 (about a grey level).
    """
    variance = sigma.double() ** 2 / _BLUR_PASSES
    whole = ((12 * variance + 1).sqrt().sub(1) / 2).floor()  # l, as Pillow (Gwosdek et al. 2011)
    part = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    taps = torch.arange(-_BOX_BLUR_REACH, _BOX_BLUR_REACH + 1, device=sigma.device).abs()
    whole = whole[:, None]
    box = torch.where(taps <= whole, 1.0, torch.where(taps == whole + 1, part[:, None], 0.0))
    return box / box.sum(dim=1, keepdim=True)


def cutmix_boxes(
    batch: int, size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[B, S, S] float 0/1 CutMix boxes as the authors draw them: none with p 0.5; else an area U(0.02, 0.4)
    S^2, then (ratio U(0.3, 1/0.3), x and y uniform in 0..S-1) redrawn until a box of w = int(sqrt(area /
    ratio)) columns by h = int(sqrt(area * ratio)) rows fits at (x, y); ones on rows y..y+h-1, cols x..x+w-1.

    The redraws are _BOX_TRIES candidates per box, the first that fits taken: the same distribution, without a
    host loop. A candidate fits with probability >= 0.059 for any area and S (the worst case, area 0.4 S^2,
    computed for S up to 4096 and in the continuous limit), so none fits with probability
    < (1 - 0.059)^512 < 4e-14: then the first candidate is moved (and cut) to fit.
    """
    u = torch.rand(batch, 2 + 3 * _BOX_TRIES, generator=generator, device=device, dtype=torch.float64)
    area = _uniform(u[:, 1:2], *_BOX_AREA) * size * size
    ratio, x, y = u[:, 2:].view(batch, 3, _BOX_TRIES).unbind(1)
    ratio = _uniform(ratio, *_BOX_RATIO)
    w, h = (area / ratio).sqrt().floor(), (area * ratio).sqrt().floor()
    x, y = (x * size).floor(), (y * size).floor()
    first = ((x + w <= size) & (y + h <= size)).to(torch.uint8).argmax(dim=1, keepdim=True)  # 0 if none fits
    w, h, x, y = (t.gather(1, first) for t in (w, h, x, y))  # [B, 1] each
    w, h = w.clamp(max=size), h.clamp(max=size)
    x, y = torch.minimum(x, size - w), torch.minimum(y, size - h)  # no-ops unless no candidate fitted
    index = torch.arange(size, device=device, dtype=torch.float64)
    rows = (index >= y) & (index < y + h) & (u[:, :1] < _BOX_P)
    cols = (index >= x) & (index < x + w)
    return (rows[:, :, None] & cols[:, None, :]).float()


def unlabelled_views(
    weak: torch.Tensor,
    padding: torch.Tensor,
    generator: torch.Generator | None = None,
    hue: float = HUE_JITTER,
):
    """Weak crops [B, 3, S, S] in [0, 1] and their padding bool [B, S, S], on the training device ->
    (weak, strong 1, strong 2) normalised, the ignore mask long [B, S, S] (PADDING on padding, else 0) and two
    CutMix boxes float [B, S, S]: the authors' unlabelled item, for the unlabelled and the mix batch alike.
    hue: the strong views' largest hue rotation."""
    batch, size, device = weak.shape[0], weak.shape[-1], weak.device
    strong, boxes = [], []
    for _ in range(2):  # two independent views, each with its own box
        strong.append(normalise(strong_view(weak, sample_strong_params(batch, generator, device, hue))))
        boxes.append(cutmix_boxes(batch, size, generator, device))
    ignore = padding.long() * PADDING
    return normalise(weak), strong[0], strong[1], ignore, boxes[0], boxes[1]

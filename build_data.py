"""Data: the dataset table, label maps, joint transforms, datasets, loaders, label-budget splits,
partial labels and the synthetic demo dataset."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from module_list import IGNORE_INDEX

# Void value of label files on disk; it becomes IGNORE_INDEX in tensors.
VOID = 255
REPO_ROOT = Path(__file__).resolve().parent
# ImageNet statistics used to normalise every image.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PARTIAL_SETTINGS = ("p0", "p1", "p5", "p25")
SPLITS = ("train", "test")
# Label-table entry for raw values that are neither a class nor void, so one vectorised test finds them.
_INVALID = 254


class DataError(Exception):
    """A problem with the user's data or data flags; the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# The dataset table: the only place per-dataset numbers live
# ---------------------------------------------------------------------------------------------


def _voc_colours(n: int) -> list[tuple[int, int, int]]:
    """Pascal VOC colours: the bits of a class index are spread, three at a time, over the high bits of R, G, B."""
    colours = []
    for index in range(n):
        rgb, value = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        colours.append(tuple(rgb))
    return colours


def _palette(colours: Sequence[tuple[int, int, int]], fill: int) -> np.ndarray:
    """uint8 [256, 3]: the given colours first, every other row (void included) filled with `fill`."""
    palette = np.full((256, 3), fill, np.uint8)
    palette[: len(colours)] = colours
    return palette


def _label_table(mapping: dict[int, int], default: int) -> np.ndarray:
    """uint8 [257]: raw label value -> class id or VOID; entry 256 stands for every raw value above 255."""
    table = np.full(257, default, np.uint8)
    for raw, cls in mapping.items():
        table[raw] = cls
    return table


def _identity_table(num_classes: int) -> np.ndarray:
    return _label_table({**{c: c for c in range(num_classes)}, VOID: VOID}, _INVALID)


_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_COLOURS = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                       (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                       (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                       (0, 80, 100), (0, 0, 230), (119, 11, 32)]
_SUN_COLOURS = [(148, 65, 137), (255, 116, 69), (86, 156, 137), (202, 179, 158), (155, 99, 235), (161, 107, 108),
                (133, 160, 103), (76, 152, 126), (84, 62, 35), (44, 80, 130), (31, 184, 157), (101, 144, 77),
                (23, 197, 62), (141, 168, 145), (142, 151, 136), (115, 201, 77), (100, 216, 255), (57, 156, 36),
                (88, 108, 129), (105, 129, 112), (42, 137, 126), (155, 108, 249), (166, 148, 143), (81, 91, 87),
                (100, 124, 51), (73, 131, 121), (157, 210, 220), (134, 181, 60), (221, 223, 147), (123, 108, 131),
                (161, 66, 179), (163, 221, 160), (31, 146, 98), (99, 121, 30), (49, 89, 240), (116, 108, 9),
                (161, 176, 169)]
_PASCAL_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                 "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                 "train", "tvmonitor")
_CITYSCAPES_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                     "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                     "motorcycle", "bicycle")
_SUN_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
              "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
              "floor mat", "clothes", "ceiling", "books", "fridge", "tv", "paper", "towel", "shower curtain", "box",
              "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag")
_DEMO_NAMES = ("background", "stripes", "checker", "dots", "blob")


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything that differs between datasets. Sizes are (H, W); batch_size is per branch in semi mode."""

    name: str
    layout: str  # folder layout on disk: 'pascal' (also the demo), 'cityscapes' or 'sun'
    class_names: tuple[str, ...]
    palette: np.ndarray  # uint8 [256, 3]; row 255 paints void / ignore
    label_table: np.ndarray  # uint8 [257]: raw label file value -> class id, VOID, or _INVALID
    crop_size: tuple[int, int]
    eval_size: tuple[int, int]
    scale_range: tuple[float, float]
    batch_size: int
    min_classes: int  # split sampler threshold (0: SUN's own loop)
    partial_labels: bool
    setup_hint: str  # how a user gets the data, quoted by errors
    # Training defaults the engine uses for flags left unset.
    epochs: int = 200
    iters_per_epoch: int = 200
    resnet_depth: int = 101
    pretrained: str = "imagenet"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def default_root(self) -> Path:
        return REPO_ROOT / "dataset" / self.name


DATASETS: dict[str, DatasetInfo] = {
    "pascal": DatasetInfo(
        name="pascal", layout="pascal", class_names=_PASCAL_NAMES, palette=_palette(_voc_colours(21), 255),
        label_table=_identity_table(21), crop_size=(321, 321), eval_size=(513, 513), scale_range=(0.5, 1.5),
        batch_size=10, min_classes=3, partial_labels=True,
        setup_hint="put VOC2012 JPEGImages/ and SegmentationClassAug/ in dataset/pascal and run "
                   "`python dataset/pascal_preprocess.py` (README, Datasets)"),
    "cityscapes": DatasetInfo(
        name="cityscapes", layout="cityscapes", class_names=_CITYSCAPES_NAMES,
        palette=_palette(_CITYSCAPES_COLOURS, 0), label_table=_label_table(_CITYSCAPES_TRAIN_IDS, VOID),
        crop_size=(512, 512), eval_size=(512, 1024), scale_range=(1.0, 1.0), batch_size=2, min_classes=12,
        partial_labels=True,
        setup_hint="put leftImg8bit_trainvaltest/ and gtFine_trainvaltest/ in dataset/ and run "
                   "`python dataset/cityscapes_preprocess.py` (README, Datasets)"),
    "sun": DatasetInfo(
        name="sun", layout="sun", class_names=_SUN_NAMES, palette=_palette(_SUN_COLOURS, 0),
        label_table=_label_table({0: VOID, **{v: v - 1 for v in range(1, 38)}}, _INVALID),
        crop_size=(321, 321), eval_size=(385, 513), scale_range=(0.5, 1.5), batch_size=5, min_classes=0,
        partial_labels=False,
        setup_hint="put SUNRGBD-{train,test}_images/ and sunrgbd_train_test_labels/ in dataset/sun and run "
                   "`python dataset/sun_preprocess.py` (README, Datasets)"),
    "demo": DatasetInfo(
        name="demo", layout="pascal", class_names=_DEMO_NAMES, palette=_palette(_voc_colours(5), 255),
        label_table=_identity_table(5), crop_size=(65, 65), eval_size=(97, 97), scale_range=(0.75, 1.25),
        batch_size=4, min_classes=2, partial_labels=True,
        setup_hint="generate it with `python dataset/demo_preprocess.py`",
        epochs=8, iters_per_epoch=25, resnet_depth=18, pretrained="none"),
}


def dataset_info(name: str) -> DatasetInfo:
    """The table entry of a dataset name (DataError naming the valid ones otherwise)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (--dataset): choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# Files: id lists, paths, reading images and labels
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def data_root(info: DatasetInfo, root: str | Path | None) -> Path:
    """The data folder (info.default_root when root is None); DataError saying how to get the data if missing."""
    path = Path(root) if root is not None else info.default_root
    if not path.is_dir():
        raise DataError(f"data root {path} for --dataset {info.name} not found: {info.setup_hint}, or pass "
                        f"--data_root DIR pointing at the preprocessed data (or try --dataset demo)")
    return path


def list_ids(info: DatasetInfo, root: str | Path | None, split: str) -> list[str]:
    """Image ids of a split, sorted where the reference listed a folder."""
    _check_split(split)
    root = data_root(info, root)
    if info.layout == "cityscapes" or (info.layout == "sun" and split == "train"):
        folder = image_path(info, root, "0", split).parent
        pattern = "*.png" if info.layout == "cityscapes" else "img-*.jpg"
        stems = [p.stem.rsplit("-", 1)[-1] for p in folder.glob(pattern)]
        ids = sorted((s for s in stems if s.isdigit()), key=int)
        if not ids:
            raise DataError(f"no {pattern} images in {folder}: {info.setup_hint}")
        return [str(int(s)) for s in ids]
    name = {"pascal": {"train": "train_aug.txt", "test": "val.txt"}, "sun": {"test": "test_idx.txt"}}[info.layout][split]
    path = root / name
    if not path.is_file():  # fall back to the lists shipped with the code
        path = REPO_ROOT / "dataset" / info.name / name
    if not path.is_file():
        raise DataError(f"id list {root / name} not found: {info.setup_hint}")
    ids = path.read_text().split()
    if not ids:
        raise DataError(f"id list {path} is empty: regenerate it ({info.setup_hint})")
    return [str(int(i)) for i in ids] if info.layout == "sun" else ids


def image_path(info: DatasetInfo, root: str | Path, image_id: str, split: str) -> Path:
    """Path of an image file in the reference's preprocessed layout."""
    root = Path(root)
    if info.layout == "pascal":
        return root / "JPEGImages" / f"{image_id}.jpg"
    if info.layout == "cityscapes":
        return root / "images" / ("train" if split == "train" else "val") / f"{image_id}.png"
    return root / f"SUNRGBD-{split}_images" / f"img-{int(image_id):06d}.jpg"


def _check_partial(info: DatasetInfo, partial: str | None) -> None:
    if partial is None:
        return
    if not info.partial_labels:
        raise DataError(f"--dataset {info.name} has no partial labels (the reference silently trained on full "
                        f"labels): drop --partial, or use a dataset with partial labels")
    if partial not in PARTIAL_SETTINGS:
        raise DataError(f"--partial {partial!r} is not a partial-label setting: choose one of "
                        f"{', '.join(PARTIAL_SETTINGS)}")


def label_path(info: DatasetInfo, root: str | Path, image_id: str, split: str, partial: str | None = None,
               partial_seed: int = 0) -> Path:
    """Path of a label PNG: the full label, or the partial one of setting `partial` and seed `partial_seed`."""
    _check_split(split)
    _check_partial(info, partial)
    suffix = f"_{partial}_{partial_seed}" if partial else ""
    root = Path(root)
    if info.layout == "pascal":
        return root / f"SegmentationClassAug{suffix}" / f"{image_id}.png"
    if info.layout == "cityscapes":
        if partial and split != "train":
            raise ValueError("partial labels exist for the train split only")
        return root / "labels" / (("train" if split == "train" else "val") + suffix) / f"{image_id}.png"
    return root / "sunrgbd_train_test_labels" / f"img-{int(image_id):06d}.png"


def _open(path: Path, what: str, hint: str) -> Image.Image:
    """Open and decode an image file, turning every failure into one DataError naming the file."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing: the id list and the data folder disagree; {hint}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode {what} {path} ({error}): the file is corrupt; replace it ({hint})") from None


def read_image(info: DatasetInfo, path: Path) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3]."""
    image = _open(path, "image", info.setup_hint)
    return np.array(image.convert("RGB"))


def read_label(info: DatasetInfo, path: Path) -> np.ndarray:
    """A label PNG (grayscale or palette: the stored indices are the values) as uint8 [H, W] of class ids / VOID."""
    image = _open(path, "label", info.setup_hint)
    if image.mode not in ("L", "P") and not image.mode.startswith("I"):
        raise DataError(f"label {path} is a {image.mode} image: labels must be single-channel PNGs "
                        f"(grayscale or palette) holding class indices; convert the colour label to indices")
    raw = np.asarray(image)
    if raw.dtype != np.uint8:  # 16/32-bit PNG: every value above 255 shares table entry 256
        raw = np.clip(raw, 0, 256)
    label = info.label_table[raw]
    invalid = label == _INVALID
    if invalid.any():
        values = np.unique(raw[invalid])[:8].tolist()
        raise DataError(f"label {path} holds values {values} that are neither a class of --dataset {info.name} "
                        f"(0..{info.num_classes - 1}) nor void {VOID}: is it the right dataset, preprocessed? "
                        f"({info.setup_hint})")
    return label


# ---------------------------------------------------------------------------------------------
# Joint transforms: one batched implementation for loader workers (B=1, CPU) and device batches
# ---------------------------------------------------------------------------------------------

_JITTER_P, _BLUR_P, _FLIP_P = 0.8, 0.5, 0.5
_JITTER_RANGE, _HUE_RANGE = (0.75, 1.25), (-0.25, 0.25)
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


def sample_params(batch: int, scale_range: tuple[float, float], generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> AugmentParams:
    """Draw every random number of one transform call at once, so a sample is a pure function of the RNG state."""
    u = torch.rand(batch, 15, generator=generator, device=device, dtype=torch.float64)
    def uniform(column: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * column

    factors = torch.cat([uniform(u[:, 4:7], *_JITTER_RANGE), uniform(u[:, 7:8], *_HUE_RANGE)], dim=1)
    return AugmentParams(
        scale=uniform(u[:, 0], *scale_range), offset_u=u[:, 1:3], jitter=u[:, 3] < _JITTER_P,
        factors=factors.float(), order=u[:, 8:12].argsort(dim=1),
        blur=u[:, 12] < _BLUR_P, sigma=uniform(u[:, 13], *_SIGMA_RANGE).float(),
        flip=u[:, 14] < _FLIP_P)


def _axis_indices(in_len: int, scale: torch.Tensor, crop: int, offset_u: torch.Tensor | None,
                  dtype: torch.dtype = torch.float32, compact: bool = False):
    """Source indices and weights along one axis for rescale (truncated size) -> pad at the end -> crop.

    Returns valid [B, crop] (inside the rescaled image, not padding), nearest [B, crop] source indices, and
    the image resize as weights, taps, index: PIL's BILINEAR filter, a triangle whose support widens by the
    shrink factor (antialiasing; plain bilinear when enlarging), centred at (i + 0.5) * in / out, its taps
    clipped to the image and normalised per output position. Padding positions take the weights of their
    reflected (edge not repeated) position. offset_u None places the crop at offset 0.

    compact False (sync-free, for GPUs): weights [B, crop, in_len], a dense matrix; taps and index None.
    compact True (reads values on the host, for CPU tensors): only the L distinct reflected positions, each
    with its K nonzero taps: weights [B, L, K] of source pixels taps [B, L, K]; index [B, crop] (or None when
    L = crop) picks each crop position's row.
    """
    size = (in_len * scale).floor().long().clamp(min=1)[:, None]  # rescaled length [B, 1]
    if offset_u is None:
        offset = torch.zeros_like(size)
    else:  # uniform over 0..padded-crop, as RandomCrop
        span = size.clamp(min=crop) - crop + 1
        offset = torch.minimum((offset_u[:, None] * span).floor().long(), span - 1)
    pos = torch.arange(crop, device=scale.device)[None] + offset  # position in the padded, rescaled axis
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
            rows = torch.minimum(torch.arange(first, last + 1, device=scale.device)[None], size - 1)
            index = folded - first
    # the weights in float64 (small); at scale 1 each row is exactly one 1 and zeros
    ratio = in_len / size.to(torch.float64)
    centre = (rows.to(torch.float64) + 0.5) * ratio  # in source pixel units
    support = ratio.clamp(min=1)  # the triangle's half width, in source pixels
    if compact:  # a window from the first pixel j with |j + 0.5 - centre| < support (PIL's xmin), long enough
        start = (centre - support + 0.5).floor().clamp(min=0)
        pixels = start[..., None] + torch.arange(int(2 * support.max()) + 2, device=scale.device)
    else:  # all pixels: a dense matrix
        pixels = torch.arange(in_len, device=scale.device, dtype=torch.float64).expand(*centre.shape, in_len)
    # in place with reciprocals: broadcast divisions of float64 are slow on a CPU
    weights = (pixels + 0.5 - centre[..., None]).abs_().mul_((1 / support)[..., None]).neg_().add_(1).clamp_(min=0)
    if compact:
        weights.masked_fill_(pixels >= in_len, 0)  # taps clipped to the image
    weights.mul_(1 / weights.sum(dim=-1, keepdim=True))  # the sum is never 0: the nearest tap is within 1/2 pixel
    if not compact:
        return valid, nearest, weights.to(dtype), None, None
    # keep the window from the first tap any row needs to the last one any row needs
    nonzero = (weights > 0).any(dim=0).any(dim=0).nonzero()[:, 0]
    first, last = int(nonzero[0]), int(nonzero[-1])
    taps = pixels[..., first:last + 1].long().clamp(max=in_len - 1)
    return valid, nearest, weights[..., first:last + 1].to(dtype), taps, index


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Per-sample gather along dim 2 (rows) or 3 (cols) of x [B, C, H, W] with index [B, L]."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = (index.shape[0], 1, -1, 1) if dim == 2 else (index.shape[0], 1, 1, -1)
    return x.gather(dim, index.view(view).expand(shape))


def _taps_resample(image, w_y, taps_y, index_y, w_x, taps_x, index_x):
    """One image [C, H, W] -> [C, crop_h, crop_w]: each output row (then column) the weighted sum of its K taps
    (weights [L, K] of source pixels taps [L, K]), summed in tap order, elementwise; then index [crop] (or None)
    picks each crop position's row (column). Works on [H, W, C]: whole rows move at once."""
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
    """Rescale, pad (image reflect, label ignore, conf 0) and crop every sample of a batch.

    Images: separable per-sample weights, antialiased as PIL's BILINEAR resize, over the crop's rows and
    columns only: images = Wy @ x @ Wx^T with dense matrices (compact False, sync-free: GPUs), or as weighted
    sums of the K nonzero taps of each distinct reflected position (compact True, the default on CPU tensors,
    where reading sizes on the host costs no sync: fewer operations, and elementwise, so the result does not
    depend on the number of threads). Labels and conf: nearest, so their values survive exactly.
    """
    (_, _, height, width), (crop_h, crop_w) = images.shape, crop_size
    compact = images.device.type == "cpu" if compact is None else compact
    valid_y, near_y, w_y, taps_y, index_y = _axis_indices(
        height, scale, crop_h, None if offset_u is None else offset_u[:, 0], images.dtype, compact)
    valid_x, near_x, w_x, taps_x, index_x = _axis_indices(
        width, scale, crop_w, None if offset_u is None else offset_u[:, 1], images.dtype, compact)
    if compact:  # per sample: index_select is much faster than gather on a CPU
        no_index = [None] * images.shape[0]
        images = torch.stack([_taps_resample(*args) for args in zip(
            images, w_y, taps_y, no_index if index_y is None else index_y,
            w_x, taps_x, no_index if index_x is None else index_x)])
    else:
        w_y, w_xt = w_y[:, None], w_x.transpose(1, 2)[:, None]  # [B, 1, crop_h, H], [B, 1, W, crop_w]
        # the cheaper order of the two passes (shapes only: no sync)
        if crop_h * width * (height + crop_w) <= crop_w * height * (width + crop_h):
            images = torch.matmul(torch.matmul(w_y, images), w_xt)
        else:
            images = torch.matmul(w_y, torch.matmul(images, w_xt))
    inside = valid_y[:, :, None] & valid_x[:, None, :]

    def nearest(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = _take(_take(x[:, None], 2, near_y), 3, near_x)[:, 0]
        return torch.where(inside, x, torch.full((), fill, dtype=x.dtype, device=x.device))

    return images, nearest(labels, IGNORE_INDEX), None if conf is None else nearest(conf, 0.0)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W]."""
    r, g, b = images.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b)[:, None]


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [B, 3, H, W] images in [0, 1] by shift [B] (in turns)."""
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    r, g, b = images.unbind(1)
    safe = chroma.clamp(min=1e-12)
    sextant = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (sextant / 6 + shift.view(-1, 1, 1)) % 1.0
    k = torch.stack([(n + 6 * hue) % 6 for n in (5.0, 3.0, 1.0)], dim=1)  # per output channel R, G, B
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def colour_jitter(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor,
                  order: torch.Tensor) -> torch.Tensor:
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
        gray = _gray(images)
        op4 = op.view(-1, 1, 1, 1)
        anchor = torch.where(op4 == 2, gray, torch.where(op4 == 1, gray.mean(dim=(2, 3), keepdim=True), 0.0))
        images = (blend * images + (1 - blend) * anchor).clamp(0, 1)
        hue = apply & (op == 3)
        if images.device.type != "cpu" or hue.any():  # skipping is free to decide on a CPU, a sync on a GPU
            images = torch.where(hue.view(-1, 1, 1, 1), shift_hue(images, torch.where(hue, factor, 0.0)), images)
    return images


def gaussian_blur(images: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur [B, C, H, W] with a per-sample Gaussian of std sigma [B] where apply [B]; others pass through exactly."""
    height, width, r = images.shape[2], images.shape[3], _BLUR_RADIUS
    taps = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    # a skipped sample gets the identity kernel (1 at the centre, exact zeros elsewhere)
    kernel = torch.where(apply[:, None], kernel / kernel.sum(dim=1, keepdim=True), (taps == 0).to(images.dtype))
    kernel = kernel.view(-1, 1, 1, 1, 2 * r + 1)
    # separable: weighted sums of shifted slices (faster than a grouped conv for one sample on a CPU)
    x = F.pad(images, (0, 0, r, r), mode="replicate")
    x = sum(kernel[..., i] * x[:, :, i:i + height] for i in range(2 * r + 1))
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    return sum(kernel[..., i] * x[..., i:i + width] for i in range(2 * r + 1))


def random_transform(images: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor | None,
                     crop_size: tuple[int, int], scale_range: tuple[float, float], augmentation: bool,
                     generator: torch.Generator | None = None):
    """The reference's joint train transform on [0, 1] images [B, 3, H, W], labels [B, H, W] long, conf [B, H, W].

    Rescale -> pad -> random crop, then (augmentation) colour jitter, blur and flip. Labels and conf use
    nearest sampling only, so their values survive exactly; pads are ignore / 0. Returns the same three.
    """
    params = sample_params(images.shape[0], scale_range, generator, images.device)
    images, labels, conf = _resample(images, labels, conf, crop_size, params.scale, params.offset_u)
    if augmentation:
        images = colour_jitter(images, params.jitter, params.factors, params.order)
        images = gaussian_blur(images, params.blur, params.sigma)
        flip = params.flip.view(-1, 1, 1)
        images = torch.where(flip[:, None], images.flip(-1), images)
        labels = torch.where(flip, labels.flip(-1), labels)
        conf = None if conf is None else torch.where(flip, conf.flip(-1), conf)
    return images, labels, conf


def batch_transform(images: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor | None,
                    crop_size: tuple[int, int], scale_range: tuple[float, float], augmentation: bool,
                    generator: torch.Generator | None = None):
    """Re-augment a normalised batch on its own device: images [B, 3, H, W], labels [B, H, W], conf [B, H, W]."""
    images, labels, conf = random_transform(denormalise(images), labels, conf, crop_size, scale_range,
                                            augmentation, generator)
    return normalise(images), labels, conf


def pad_to(images: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]):
    """The eval path: pad (image reflect, label ignore) or cut to size at offset (0, 0); no randomness."""
    ones = torch.ones(images.shape[0], device=images.device, dtype=torch.float64)
    images, labels, _ = _resample(images, labels, None, size, ones, None)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Dataset and loaders
# ---------------------------------------------------------------------------------------------


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and labels of one split. Item -> (image float [3, h, w] normalised, label long [h, w]).

    split='train': random rescale/crop (+ augmentation) to crop_size (default info.crop_size); an item index
    may be an (index, seed) pair, which makes its augmentation a pure function of the seed.
    split='test': padded to crop_size (default info.eval_size) at offset (0, 0), no randomness.
    """

    def __init__(self, info: DatasetInfo, root: str | Path | None, ids: Sequence[str], split: str = "train",
                 partial: str | None = None, partial_seed: int = 0, crop_size: tuple[int, int] | None = None,
                 scale_range: tuple[float, float] = (1.0, 1.0), augmentation: bool = False):
        _check_split(split)
        _check_partial(info, partial)
        self.info, self.root, self.ids, self.split = info, data_root(info, root), list(ids), split
        self.partial, self.partial_seed = partial, partial_seed
        self.crop_size = tuple(crop_size or (info.crop_size if split == "train" else info.eval_size))
        self.scale_range, self.augmentation = tuple(scale_range), augmentation
        if partial is not None and self.ids:
            folder = label_path(info, self.root, self.ids[0], split, partial, partial_seed).parent
            if not folder.is_dir():
                raise DataError(f"partial-label folder {folder} (--partial {partial}, seed {partial_seed}) not found: "
                                f"{info.setup_hint}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The untransformed pair: image float [3, H, W] in [0, 1], label long [H, W] with IGNORE_INDEX."""
        image_id = self.ids[index]
        path = label_path(self.info, self.root, image_id, self.split, self.partial, self.partial_seed)
        image = read_image(self.info, image_path(self.info, self.root, image_id, self.split))
        label = read_label(self.info, path)
        if image.shape[:2] != label.shape:
            raise DataError(f"label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
                            f"{image.shape[1]}x{image.shape[0]} (WxH): re-run the preprocessing ({self.info.setup_hint})")
        label = torch.from_numpy(label).long()
        label[label == VOID] = IGNORE_INDEX
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255), label

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.load(index)
        if self.split == "test":
            image, label = pad_to(image[None], label[None], self.crop_size)
        else:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            image, label, _ = random_transform(image[None], label[None], None, self.crop_size, self.scale_range,
                                               self.augmentation, generator)
        return normalise(image[0]), label[0]


def _mix_seed(*values: int) -> int:
    """One well-mixed 64-bit seed from several integers."""
    return int(np.random.SeedSequence([v % 2**63 for v in values]).generate_state(1, np.uint64)[0])


class EpochBatchSampler(torch.utils.data.Sampler):
    """iters_per_epoch batches of (index, sample_seed) pairs drawn with replacement; a pure function of
    (seed, epoch, rank), so it does not depend on the number of workers."""

    def __init__(self, num_items: int, batch_size: int, iters_per_epoch: int, seed: int = 0, rank: int = 0):
        if num_items < 1:
            raise DataError("the training set is empty: check the id list / split")
        self.num_items, self.batch_size, self.iters = num_items, batch_size, iters_per_epoch
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank))
        index = torch.randint(self.num_items, (self.iters, self.batch_size), generator=generator)
        seeds = torch.randint(2**62, (self.iters, self.batch_size), generator=generator)
        for row_index, row_seed in zip(index.tolist(), seeds.tolist()):
            yield list(zip(row_index, row_seed))

    def __len__(self) -> int:
        return self.iters


class TrainLoader:
    """A DataLoader over an EpochBatchSampler: len() batches per epoch; call set_epoch(e) before epoch e."""

    def __init__(self, dataset: SegmentationDataset, sampler: EpochBatchSampler, num_workers: int, seed: int,
                 pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            # seeds the workers' torch, numpy and random streams: distinct per worker, reproducible per run
            generator=torch.Generator().manual_seed(_mix_seed(seed, sampler.rank)))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_loader(dataset: SegmentationDataset, batch_size: int, iters_per_epoch: int, num_workers: int = 0,
                       seed: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> TrainLoader:
    """Sampling with replacement, exactly iters_per_epoch batches per epoch; each rank draws its own samples.

    The rank enters the draw's seed, so world_size is not needed (kept for symmetry with build_test_loader).
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, iters_per_epoch, seed, rank)
    return TrainLoader(dataset, sampler, num_workers, seed, pin_memory)


def build_test_loader(dataset: SegmentationDataset, batch_size: int = 4, num_workers: int = 0, rank: int = 0,
                      world_size: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """In order; with world_size > 1 rank r takes the r-th contiguous shard (shards are disjoint, no padding)."""
    n = len(dataset)
    shard = range(n * rank // world_size, n * (rank + 1) // world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=num_workers > 0)


def color_map(label: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Paint a label map [H, W] with a palette [256, 3]: uint8 [H, W, 3]; IGNORE_INDEX / VOID use row 255."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label).astype(np.int64)
    return palette[np.where(label < 0, VOID, np.minimum(label, 255))]


# ---------------------------------------------------------------------------------------------
# Splits, partial labels and the demo dataset (below this line)
# ---------------------------------------------------------------------------------------------

# Partial-label settings in the order the reference draws them: the first pass over all files
# draws p25, p5, p1 per file; a second pass draws p0 (one pixel per class).
PARTIAL_FRACTIONS = {"p25": 0.25, "p5": 0.05, "p1": 0.01}
PARTIAL_SEEDS = (0, 1, 2)


def read_png(path: Path) -> np.ndarray:
    """Raw values of a single-channel label PNG as uint8 [H, W] (no class remapping)."""
    try:
        with Image.open(path) as img:
            array = np.array(img)
    except OSError as err:
        raise DataError(f"cannot read label file {path}: {err}; re-create it with the dataset's "
                        f"preprocessing script") from err
    if array.ndim != 2 or array.dtype != np.uint8:
        raise DataError(f"label file {path} is not a single-channel 8-bit PNG (shape {array.shape}, "
                        f"dtype {array.dtype}); labels must hold one class id per pixel")
    return array


def write_png(path: Path, array: np.ndarray) -> None:
    """Save uint8 [H, W] as a grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path)


def _valid_classes(label: np.ndarray, void_values: Collection[int]) -> np.ndarray:
    """Class values present in label [H, W], ascending, without the void values."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return present[~np.isin(present, list(void_values))]


def partial_label(label: np.ndarray, rng: np.random.RandomState, fraction: float,
                  void_values: Collection[int] = (VOID,), fill: int = VOID) -> np.ndarray:
    """Partial label uint8 [H, W] from a full label [H, W]: per valid class, a square around one random
    pixel of the class, grown 2 px per side until it covers int(fraction * class size) class pixels,
    clipped to the class (fraction 0: the single pixel). Other pixels are `fill`."""
    height, width = label.shape
    flat = label.ravel()
    out = np.full(flat.size, fill, np.uint8)
    row_of = np.repeat(np.arange(height, dtype=np.int32), width)  # flat index -> row, column
    col_of = np.tile(np.arange(width, dtype=np.int32), height)
    for c in _valid_classes(label, void_values):
        pixels = np.flatnonzero(flat == c)  # row-major, as np.nonzero lists them
        # The reference's exact draw: legacy choice without replacement (a full permutation).
        seed = pixels[rng.choice(pixels.size, 1, replace=False)[0]]
        # k dilations of the seed by a 5x5 square reach exactly the pixels at Chebyshev distance <= 2k, so
        # the reference's "dilate until enough class pixels" stops at the smallest even distance that
        # covers the target-th nearest class pixel.
        dist = np.maximum(np.abs(row_of[pixels] - row_of[seed]), np.abs(col_of[pixels] - col_of[seed]))
        target = int(fraction * pixels.size)
        nearest = int(np.searchsorted(np.bincount(dist).cumsum(), target)) if target > 1 else 0
        out[pixels[dist <= nearest + nearest % 2]] = c
    return out.reshape(label.shape)


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing an old `dest` without a half-written moment."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)


def _write_partial_seed(label_files: Sequence[Path], dest: Path, folder_format: str, seed: int,
                        void_values: Collection[int], fill: int, progress: bool, bar_position: int = 0) -> None:
    """The four partial-label folders of one seed, written aside and renamed into place."""
    settings = [*PARTIAL_FRACTIONS.items(), ("p0", 0.0)]
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{seed}-", dir=dest))
    try:
        for name, _ in settings:
            (tmp / name).mkdir()
        rng = np.random.RandomState(seed)  # the same stream as np.random.seed(seed)
        with tqdm(total=2 * len(label_files), desc=f"partial labels, seed {seed}", disable=not progress,
                  position=bar_position) as bar:
            for pass_settings in (settings[:3], settings[3:]):
                for path in label_files:
                    label = read_png(path)
                    for name, fraction in pass_settings:
                        write_png(tmp / name / path.name, partial_label(label, rng, fraction, void_values, fill))
                    bar.update()
        for name, _ in settings:
            replace_dir(tmp / name, dest / folder_format.format(partial=name, seed=seed))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_partial_labels(label_files: Sequence[Path], dest: Path, folder_format: str,
                         seeds: Sequence[int] = PARTIAL_SEEDS, void_values: Collection[int] = (VOID,),
                         fill: int = VOID, progress: bool = False, workers: int = 1) -> None:
    """Write the p25/p5/p1/p0 partial labels of `label_files` (in the given order, which fixes the
    random stream) into dest/folder_format.format(partial=..., seed=...)/<file name>, for every seed
    (seeds are independent streams, so up to `workers` processes run them side by side)."""
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [(list(label_files), dest, folder_format, seed, tuple(void_values), fill, progress, k)
            for k, seed in enumerate(seeds)]
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _write_partial_seed(*job)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        for future in [pool.submit(_write_partial_seed, *job) for job in jobs]:
            future.result()


# --- the synthetic demo dataset (Pascal layout, 5 classes) ---

# Per object class: base colour (RGB) and second texture colour.
_DEMO_COLOURS = {
    1: ((220, 60, 50), (120, 20, 20)),     # stripes: red / dark red
    2: ((40, 90, 210), (230, 230, 240)),   # checker: blue / white
    3: ((40, 150, 60), (240, 220, 40)),    # dots: green with yellow dots
    4: ((150, 70, 190), (190, 120, 230)),  # blob: smooth shaded purple
}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of mask [H, W] with a (2r+1) x (2r+1) square (zero outside the image)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(ahead)] |= out[tuple(behind)]
            grown[tuple(behind)] |= out[tuple(ahead)]
        out = grown
    return out


def _demo_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image uint8 [size, size, 3] and its label uint8 [size, size] (0..4, VOID borders)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a smooth gradient between two dull colours plus pixel noise.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.75) / 1.5
    c0, c1 = rng.uniform(70, 170, size=(2, 3))
    image = c0 + (c1 - c0) * ramp[..., None]
    label = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for index, cls in enumerate(rng.integers(1, 5, size=rng.integers(2, 5)), start=1):
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        radius = rng.uniform(0.12, 0.28)
        theta = np.arctan2(yy - cy, xx - cx)
        dist = np.hypot(yy - cy, xx - cx)
        shape = rng.integers(3)
        if shape == 0:  # ellipse
            ry, rx = radius * rng.uniform(0.6, 1.0, size=2)
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        elif shape == 1:  # rotated rectangle
            rot = rng.uniform(0, np.pi)
            u = np.cos(rot) * (xx - cx) + np.sin(rot) * (yy - cy)
            v = -np.sin(rot) * (xx - cx) + np.cos(rot) * (yy - cy)
            region = (np.abs(u) <= radius) & (np.abs(v) <= radius * rng.uniform(0.4, 0.9))
        else:  # wobbly blob
            phase = rng.uniform(0, 2 * np.pi, size=2)
            edge = radius * (1 + 0.25 * np.sin(3 * theta + phase[0]) + 0.12 * np.sin(5 * theta + phase[1]))
            region = dist <= edge
        base, second = (np.array(c, np.float32) + rng.uniform(-20, 20, size=3) for c in _DEMO_COLOURS[cls])
        px, py = xx * size, yy * size
        if cls == 1:  # stripes at a random angle, period 6-10 px
            rot, period = rng.uniform(0, np.pi), rng.uniform(6, 10)
            pattern = np.sin(2 * np.pi * (np.cos(rot) * px + np.sin(rot) * py) / period) > 0
        elif cls == 2:  # checkerboard, cells of 4-6 px
            cell = rng.integers(4, 7)
            pattern = ((px // cell + py // cell) % 2).astype(bool)
        elif cls == 3:  # dots on a lattice
            step = rng.uniform(6, 9)
            pattern = np.hypot(px % step - step / 2, py % step - step / 2) < step / 4
        else:  # smooth radial shading
            pattern = None
        if pattern is None:
            shade = np.clip(1 - dist / (2 * radius), 0, 1)[..., None]
            texture = base + (second - base) * shade
        else:
            texture = np.where(pattern[..., None], second, base)
        image = np.where(region[..., None], texture, image)
        label[region] = cls
        instances[region] = index
    # VOC-like void band: 2 px outside every visible object (objects also border each other).
    void = np.zeros((size, size), bool)
    for index in np.unique(instances[instances > 0]):
        obj = instances == index
        void |= _dilate(obj, 2) & ~obj
    label[void] = VOID
    image = image + rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), label


_DEMO_MARKER = "DEMO_DATASET"  # file that marks a folder as a generated demo dataset


def make_demo_dataset(root: str | os.PathLike, seed: int = 0, num_train: int = 240, num_val: int = 48,
                      size: int = 96, partial_seeds: Sequence[int] = PARTIAL_SEEDS) -> Path:
    """Generate the synthetic demo dataset in the Pascal layout under `root` (deterministic in `seed`):
    JPEGImages/{id}.jpg, SegmentationClassAug/{id}.png, train_aug.txt, val.txt and the partial labels
    SegmentationClassAug_{p0,p1,p5,p25}_{s}. Written aside and renamed into place; returns root."""
    root = Path(root)
    if num_train < 1 or num_val < 1 or size < 16:
        raise ValueError(f"the demo dataset needs num_train >= 1, num_val >= 1 and size >= 16 (got {num_train}, "
                         f"{num_val}, {size})")
    if root.exists() and any(root.iterdir()) and not (root / _DEMO_MARKER).exists():
        raise DataError(f"{root} exists and is not a demo dataset made by this project; pass another "
                        f"root folder or delete this one")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClassAug").mkdir()
        ids = {"train_aug": [f"train_{i:05d}" for i in range(num_train)],
               "val": [f"val_{i:05d}" for i in range(num_val)]}
        for split_code, (split, split_ids) in enumerate(ids.items()):
            for i, sample_id in enumerate(split_ids):
                image, label = _demo_sample(np.random.default_rng([seed, split_code, i]), size)
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{sample_id}.jpg", quality=95)
                write_png(tmp / "SegmentationClassAug" / f"{sample_id}.png", label)
            (tmp / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
        label_files = sorted((tmp / "SegmentationClassAug").glob("*.png"))
        write_partial_labels(label_files, tmp, "SegmentationClassAug_{partial}_{seed}", partial_seeds)
        (tmp / _DEMO_MARKER).write_text(f"seed={seed} num_train={num_train} num_val={num_val} size={size}\n")
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# --- label-budget splits (full-label mode) ---

ClassSets = Mapping[str, Collection[int]] | Callable[[str], Collection[int]]


def _budget_error(num_labels: int, got: int, why: str) -> DataError:
    return DataError(f"cannot pick {num_labels} labelled images: {why} (picked {got}); pass a smaller "
                     f"--num_labels, or --num_labels 0 to use every training image")


def select_labelled(ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int, num_classes: int,
                    min_classes: int) -> tuple[list[str], list[str]]:
    """The reference's class-balanced greedy split (Pascal, Cityscapes): returns (labelled ids in selection
    order, the other ids in list order). `class_sets` maps an id to its classes (void excluded); it is
    called lazily and may be called again for the same id."""
    classes_of = class_sets if callable(class_sets) else class_sets.__getitem__
    if not 0 <= num_labels <= len(ids):
        raise _budget_error(num_labels, 0, f"the training list has {len(ids)} images")
    work = list(ids)
    random.Random(seed).shuffle(work)  # the only random draw, as random.seed(seed); random.shuffle(...)
    counter = [0] * num_classes
    least_seen = set(range(num_classes))
    labelled: list[str] = []
    rejected: list[str] = []
    failed: set[str] = set()  # ids rejected since the last accept
    while len(labelled) < num_labels:
        if not work:
            work, rejected = rejected, []
        candidate = work.pop()
        classes = set(classes_of(candidate))
        if len(classes) >= min_classes and (not labelled or classes & least_seen):
            labelled.append(candidate)
            for c in classes:
                counter[c] += 1
            failed.clear()
        else:
            rejected.append(candidate)
            failed.add(candidate)
            # Acceptance depends only on the counters, so once every remaining id failed since the last
            # accept, no id can ever pass: the reference would loop forever here.
            if len(failed) == len(work) + len(rejected):
                need = f" including one of the least-seen classes {sorted(least_seen)}" if labelled else ""
                raise _budget_error(num_labels, len(labelled),
                                    f"no remaining image has >= {min_classes} classes{need}")
        fewest = min(counter)
        least_seen = {c for c in range(num_classes) if counter[c] == fewest}
    chosen = set(labelled)
    return labelled, [i for i in ids if i not in chosen]


def select_labelled_sun(ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int,
                        num_classes: int) -> tuple[list[str], list[str]]:
    """The reference's SUN split: take images from the per-class lists of the least-seen class (no minimum
    class count). Returns (labelled ids in selection order, the other ids in list order). Where the
    reference crashes (every least-seen class ran out of images), the least-seen set is recomputed."""
    classes_of = class_sets if callable(class_sets) else class_sets.__getitem__
    if not 0 <= num_labels <= len(ids):
        raise _budget_error(num_labels, 0, f"the training list has {len(ids)} images")
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    class_list: list[list[str]] = [[] for _ in range(num_classes)]
    for i in shuffled:
        for c in classes_of(i):
            class_list[c].append(i)
    counter = np.zeros(num_classes, np.int64)
    active = np.ones(num_classes, bool)
    fill = list(range(num_classes))
    labelled: list[str] = []
    chosen: set[str] = set()
    while len(labelled) < num_labels:
        if not fill:  # the reference crashes here; carry on with the least-seen classes that have images
            if not active.any():
                raise _budget_error(num_labels, len(labelled), "every image containing a class was taken")
            fill = np.flatnonzero(active & (counter == counter[active].min())).tolist()
        if class_list[fill[0]]:
            candidate = class_list[fill[0]].pop()
            if candidate not in chosen:
                labelled.append(candidate)
                chosen.add(candidate)
                counter[list(classes_of(candidate))] += 1
                fill = np.flatnonzero(active & (counter == counter[active].min())).tolist()
        else:  # this class has no images left: it stops counting
            active[fill[0]] = False
            fill = fill[1:]
    return labelled, [i for i in ids if i not in chosen]


def get_split(info: DatasetInfo, root: str | os.PathLike | None, num_labels: int, seed: int
              ) -> tuple[list[str], list[str]]:
    """(labelled ids, unlabelled ids) of the training set for a label budget; 0 -> (all ids, all ids)."""
    root = data_root(info, root)
    ids = list_ids(info, root, "train")
    if num_labels == 0:
        return list(ids), list(ids)
    cache: dict[str, frozenset[int]] = {}

    def classes_of(i: str) -> frozenset[int]:  # read_label rejects values outside the classes
        if i not in cache:
            label = read_label(info, label_path(info, root, i, "train"))
            cache[i] = frozenset(_valid_classes(label, (VOID,)).tolist())
        return cache[i]

    if info.min_classes == 0:
        return select_labelled_sun(ids, classes_of, num_labels, seed, info.num_classes)
    return select_labelled(ids, classes_of, num_labels, seed, info.num_classes, info.min_classes)


def write_split_dir(path: str | os.PathLike, labelled: Sequence[str], unlabelled: Sequence[str]) -> None:
    """Write path/labelled.txt and path/unlabelled.txt, one id per line."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, split_ids in (("labelled.txt", labelled), ("unlabelled.txt", unlabelled)):
        tmp = path / f".{name}.tmp{os.getpid()}"
        tmp.write_text("".join(f"{i}\n" for i in split_ids))
        os.replace(tmp, path / name)


def read_split_dir(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) ids from a folder written by write_split_dir or dataset/make_splits.py."""
    path = Path(path)
    lists = []
    for name in ("labelled.txt", "unlabelled.txt"):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"split file {file} does not exist: --split_dir must be a folder written "
                                    f"by dataset/make_splits.py (labelled.txt and unlabelled.txt)")
        lists.append([line.strip() for line in file.read_text().splitlines() if line.strip()])
    if not lists[0]:
        raise DataError(f"split file {path / 'labelled.txt'} lists no ids; re-create it with "
                        f"dataset/make_splits.py")
    return lists[0], lists[1]


# --- preprocessing helpers (dataset/*_preprocess.py) ---


def _resize_one(job: tuple[Path, Path, tuple[int, int], int, str | None]) -> None:
    src, dst, size, resample, mode = job
    try:
        with Image.open(src) as img:
            img = img.convert(mode) if mode else img
            img.resize(size, resample).save(dst)
    except OSError as err:
        raise DataError(f"cannot read {src}: {err}; re-download or replace the file") from None


def resize_files(pairs: Sequence[tuple[Path, Path]], size: tuple[int, int], resample: int,
                 mode: str | None = None, workers: int = 1, desc: str = "resizing") -> None:
    """Resize every (source, destination) image to size (W, H) with `resample` (converted to `mode`
    first if given), the format following the destination suffix; with a progress bar."""
    jobs = [(src, dst, size, resample, mode) for src, dst in pairs]
    with tqdm(total=len(jobs), desc=desc) as bar:
        if workers <= 1:
            for job in jobs:
                _resize_one(job)
                bar.update()
            return
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_resize_one, jobs, chunksize=8):
                bar.update()

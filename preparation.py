"""Offline data preparation the dataset/ scripts run: partial labels, the synthetic demo dataset and
resizing, each written into a staged folder and renamed into place."""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from build_data import DataError, present_classes, read_label_values
from dataset_card import CLASSES_FILE, OVERRIDES_FILE
from dataset_table import DATASETS, FOLDER, UNLABELLED_DIR, VOID
from helpers import replace_dir, staged_dir

# Partial-label settings in the order the reference draws them: the first pass over all files
# draws p25, p5, p1 per file; a second pass draws p0 (one pixel per class).
PARTIAL_FRACTIONS = {"p25": 0.25, "p5": 0.05, "p1": 0.01}
PARTIAL_SEEDS = (0, 1, 2)
# Where a folder dataset's partial labels go, beside its full ones: DIR/labels/train_{p0,p1,p5,p25}_{seed}/.
FOLDER_PARTIAL_FORMAT = "train_{partial}_{seed}"


def read_png(path: Path) -> np.ndarray:
    """Raw values of a single-channel 8-bit label PNG as uint8 [H, W] (no class remapping)."""
    label = read_label_values(path, "re-create it with the dataset's preprocessing script")
    if label.dtype != np.uint8:
        raise DataError(
            f"label file {path} is not an 8-bit PNG: partial labels are written from 8-bit "
            f"labels holding one class id per pixel; convert it with values 0..255"
        )
    return label


def write_png(path: Path, array: np.ndarray) -> None:
    """Save uint8 [H, W] as a grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(path)


def partial_label(
    label: np.ndarray,
    rng: np.random.RandomState,
    fraction: float,
    void_values: Collection[int] = (VOID,),
    fill: int = VOID,
) -> np.ndarray:
    """Partial label uint8 [H, W] from a full label [H, W]: per valid class, a square around one random
    pixel of the class, grown 2 px per side until it covers int(fraction * class size) class pixels,
    clipped to the class (fraction 0: the single pixel). Other pixels are `fill`."""
    height, width = label.shape
    flat = label.ravel()
    out = np.full(flat.size, fill, np.uint8)
    row_of = np.repeat(np.arange(height, dtype=np.int32), width)  # flat index -> row, column
    col_of = np.tile(np.arange(width, dtype=np.int32), height)
    for c in present_classes(label, void_values):
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


def _write_partial_seed(
    label_files: Sequence[Path],
    dest: Path,
    folder_format: str,
    seed: int,
    void_values: Collection[int],
    fill: int,
    progress: bool,
    bar_position: int = 0,
) -> None:
    """The four partial-label folders of one seed, written aside and renamed into place."""
    settings = [*PARTIAL_FRACTIONS.items(), ("p0", 0.0)]
    with staged_dir(dest, f"partial-{seed}") as tmp:
        for name, _ in settings:
            (tmp / name).mkdir()
        rng = np.random.RandomState(seed)  # the same stream as np.random.seed(seed)
        with tqdm(
            total=2 * len(label_files),
            desc=f"partial labels, seed {seed}",
            disable=not progress,
            position=bar_position,
        ) as bar:
            for pass_settings in (settings[:3], settings[3:]):
                for path in label_files:
                    label = read_png(path)
                    for name, fraction in pass_settings:
                        write_png(
                            tmp / name / path.name, partial_label(label, rng, fraction, void_values, fill)
                        )
                    bar.update()
        for name, _ in settings:
            replace_dir(tmp / name, dest / folder_format.format(partial=name, seed=seed))


def write_partial_labels(
    label_files: Sequence[Path],
    dest: Path,
    folder_format: str,
    seeds: Sequence[int] = PARTIAL_SEEDS,
    void_values: Collection[int] = (VOID,),
    fill: int = VOID,
    progress: bool = False,
    workers: int = 1,
) -> None:
    """Write the p25/p5/p1/p0 partial labels of `label_files` (in the given order, which fixes the
    random stream) into dest/folder_format.format(partial=..., seed=...)/<file name>, for every seed
    (seeds are independent streams, so up to `workers` processes run them side by side)."""
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [
        (list(label_files), dest, folder_format, seed, tuple(void_values), fill, progress, k)
        for k, seed in enumerate(seeds)
    ]
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _write_partial_seed(*job)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        for future in [pool.submit(_write_partial_seed, *job) for job in jobs]:
            future.result()


# --- the synthetic demo dataset (Pascal layout: textured shapes under nuisance conditions, docs/demo.md) ---


class _Site(NamedTuple):
    """Where a demo image is taken: one combination of the seven nuisance factors' levels."""

    site: str
    light: str  # even, dim, bright, shadow (a strong light gradient), flat (low contrast)
    cast: str  # neutral, warm, cool, green, grey
    blur: str  # sharp, soft
    noise: str  # clean, grainy
    scale: str  # far, normal, near
    clutter: str  # none, lines
    occlusion: str  # none, bars


# The 16 sites. Image k of a split is taken at site k mod 16, so every split holds each site about equally
# often, while 15 labelled images (the default budget) always miss one at least.
DEMO_SITES = tuple(
    _Site(*row.split())
    for row in (
        "studio     even   neutral sharp clean  normal none  none",
        "dusk       dim    warm    sharp grainy normal none  none",
        "overcast   flat   cool    soft  clean  normal none  none",
        "archive    even   grey    soft  grainy normal none  none",
        "street     shadow neutral sharp clean  far    lines none",
        "workshop   even   warm    sharp clean  near   lines bars",
        "aquarium   dim    green   soft  clean  normal none  none",
        "window     shadow warm    sharp clean  near   none  bars",
        "drone      bright neutral sharp clean  far    none  none",
        "night      dim    cool    sharp grainy far    none  none",
        "newsprint  flat   grey    sharp grainy near   lines none",
        "fog        flat   neutral soft  clean  normal none  bars",
        "greenhouse bright green   sharp grainy normal lines bars",
        "cctv       dim    grey    sharp grainy far    lines none",
        "stage      shadow cool    sharp clean  normal none  bars",
        "beach      bright warm    soft  clean  near   lines none",
    )
)
DEMO_CONDITIONS = "conditions.json"  # per-image records of the generator's conditions, beside the data
_SCALES = {"far": 0.8, "normal": 1.0, "near": 1.25}
_CASTS = {
    "neutral": (1.0, 1.0, 1.0),
    "warm": (1.2, 1.0, 0.8),
    "cool": (0.8, 0.95, 1.2),
    "green": (0.85, 1.2, 0.85),
}
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
# Per class: the texture's two colours (RGB), jittered per object. Colour is the quickest cue to learn and
# the one that casts, grey film and dim light take away; shape and texture stay.
_DEMO_COLOURS = {
    "striped_disc": ((205, 45, 40), (250, 175, 150)),  # red
    "checked_square": ((40, 80, 205), (205, 215, 250)),  # blue
    "dotted_triangle": ((40, 140, 50), (205, 240, 120)),  # green
    "plain_cross": ((235, 165, 30), (115, 65, 10)),  # orange
    "ringed_star": ((140, 60, 185), (230, 180, 240)),  # purple
    "speckled_ring": ((20, 150, 160), (10, 60, 70)),  # teal
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


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Pixels of a shape of the given radius, in coordinates (u, v) [H, W] rotated about its centre."""
    dist, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disc":
        return dist <= radius
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= radius * 0.85
    if shape == "triangle":  # equilateral, circumradius `radius`: three half-planes
        sides = [np.cos(a) * u + np.sin(a) * v <= radius / 2 for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        return np.all(sides, axis=0)
    if shape == "cross":
        short, long = np.minimum(np.abs(u), np.abs(v)), np.maximum(np.abs(u), np.abs(v))
        return (long <= radius) & (short <= radius * 0.4)
    if shape == "star":  # five rounded points
        return dist <= radius * (0.7 + 0.3 * np.cos(5 * theta))
    if shape == "ring":
        return (dist <= radius) & (dist >= radius * 0.55)
    raise ValueError(f"unknown demo shape {shape!r}")


def _texture_mask(
    texture: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Pixels of the texture's second colour, in pattern coordinates (u, v) [H, W] centred on the object
    (None: a smooth shading instead)."""
    if texture == "striped":
        return np.sin(2 * np.pi * u / period) > 0
    if texture == "ringed":  # concentric rings around the object's centre
        return np.sin(2 * np.pi * np.hypot(u, v) / period) > 0
    if texture == "checked":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 1
    if texture == "dotted":
        return np.hypot(u % period - period / 2, v % period - period / 2) < period / 4
    if texture == "plain":  # no pattern: smooth shading from one colour at the centre to the other at the rim
        return None
    if texture == "speckled":  # random cells of half a period
        cells = rng.random((64, 64)) < 0.5
        return cells[(u // (period / 2)).astype(int) % 64, (v // (period / 2)).astype(int) % 64]
    raise ValueError(f"unknown demo texture {texture!r}")


def _light(
    image: np.ndarray, light: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """The scene [H, W, 3] (0..255) under the site's light; yy, xx [H, W] are pixel coordinates in 0..1."""
    if light == "dim":
        return image * rng.uniform(0.7, 0.8)
    if light == "bright":
        return image * rng.uniform(1.4, 1.6) + 20
    if light == "flat":  # low contrast, as through haze
        return 150 + (image - 150) * rng.uniform(0.65, 0.75)
    if light == "shadow":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)  # -0.71..0.71
        return image * np.clip(0.8 + 0.6 * ramp, 0.4, 1.25)[..., None]
    return image


def _demo_scene(
    rng: np.random.Generator,
    size: int,
    site: _Site,
    class_names: Sequence[str],
    yy: np.ndarray,
    xx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene before the camera: image float [H, W, 3] (0..255), label uint8 [H, W] (class c > 0 is named
    '<texture>_<shape>'), instances int32 [H, W] (0: background, k: the k-th object's visible pixels)."""
    scale = _SCALES[site.scale] * rng.uniform(0.9, 1.1)
    # Background: a smooth gradient between two dull colours.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.75) / 1.5
    c0, c1 = rng.uniform(70, 170, size=(2, 3))
    image = c0 + (c1 - c0) * ramp[..., None]
    if site.clutter == "lines":  # thin lines and specks of any colour, all background
        for _ in range(rng.integers(5, 10)):
            (y0, x0), direction = rng.uniform(0, 1, size=2), rng.uniform(0, np.pi)
            across = np.abs(-np.sin(direction) * (xx - x0) + np.cos(direction) * (yy - y0)) * size
            along = np.abs(np.cos(direction) * (xx - x0) + np.sin(direction) * (yy - y0))
            line = (across < rng.uniform(0.5, 1.5)) & (along < rng.uniform(0.1, 0.4))
            image[line] = rng.uniform(20, 235, size=3)
    label = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for index, cls in enumerate(rng.integers(1, len(class_names), size=rng.integers(2, 5)), start=1):
        texture, shape = class_names[cls].split("_")
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        rot, pattern_rot = rng.uniform(0, 2 * np.pi, size=2)
        u = (np.cos(rot) * (xx - cx) + np.sin(rot) * (yy - cy)) * size
        v = (-np.sin(rot) * (xx - cx) + np.cos(rot) * (yy - cy)) * size
        radius = size * scale * rng.uniform(0.18, 0.28)
        region = _shape_mask(shape, u, v, radius)
        turn = pattern_rot - rot  # the pattern's own rotation, in the object's coordinates
        pu, pv = np.cos(turn) * u + np.sin(turn) * v, -np.sin(turn) * u + np.cos(turn) * v
        second = _texture_mask(texture, pu, pv, 7.5 * scale * rng.uniform(0.9, 1.1), rng)
        first, other = (np.array(c) + rng.uniform(-25, 25, size=3) for c in _DEMO_COLOURS[class_names[cls]])
        if second is None:
            shade = np.clip(np.hypot(u, v)[region] / radius, 0, 1)[:, None]
            image[region] = first + (other - first) * shade
        else:
            image[region] = np.where(second[region][:, None], other, first)
        label[region] = cls
        instances[region] = index
    if site.occlusion == "bars":  # plain bars in front of the objects: background where they cover
        for _ in range(rng.integers(1, 3)):
            (y0, x0), direction = rng.uniform(0.1, 0.9, size=2), rng.uniform(0, np.pi)
            across = np.abs(-np.sin(direction) * (xx - x0) + np.cos(direction) * (yy - y0))
            bar = across < rng.uniform(0.03, 0.06)
            image[bar] = rng.uniform(60, 200, size=3)
            label[bar] = 0
            instances[bar] = 0
    return image, label, instances


def _demo_camera(
    rng: np.random.Generator, image: np.ndarray, site: _Site, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """The scene float [H, W, 3] as the site's camera records it (light, cast, focus, noise): uint8."""
    image = _light(image, site.light, rng, yy, xx)
    grey = site.cast == "grey"
    image = image @ np.outer(_GREY, np.ones(3, np.float32)) if grey else image * np.array(_CASTS[site.cast])
    if site.blur == "soft":
        image = ndimage.gaussian_filter(image, sigma=(*[rng.uniform(0.8, 1.1)] * 2, 0))
    noise_sigma = rng.uniform(6, 9) if site.noise == "grainy" else 4.0
    noise = rng.normal(0, noise_sigma, size=(*image.shape[:2], 1) if grey else image.shape)  # grey film grain
    return np.clip(image + noise, 0, 255).round().astype(np.uint8)


def _demo_sample(
    rng: np.random.Generator, size: int, site: _Site, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image uint8 [size, size, 3] taken at `site` and its label uint8 [size, size] (class ids,
    VOID borders)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image, label, instances = _demo_scene(rng, size, site, class_names, yy, xx)
    # VOC-like void band: 2 px outside every visible object part (objects also border each other).
    for index in np.unique(instances[instances > 0]):
        obj = instances == index
        label[_dilate(obj, 2) & ~obj] = VOID
    return _demo_camera(rng, image, site, yy, xx), label


_DEMO_MARKER = "DEMO_DATASET"  # file that marks a folder as a generated demo dataset, with its settings
# The generator's version in the marker: raised whenever the same settings give other images or classes, so
# that a demo folder written by an older release is written again rather than read with the new class table.
DEMO_VERSION = 2
_MARKER_SETTINGS = ("seed", "num_train", "num_val", "size")


def demo_to_generate(root: Path) -> dict | None:
    """make_demo_dataset's settings for a Pascal-layout demo folder that must be (re)written: {} where it
    has no data yet, the marker's own settings where an older generator wrote it; None where it is current
    (or not a generated demo, which is read as it is)."""
    if not (root / "train_aug.txt").is_file():
        return {}
    marker = root / _DEMO_MARKER
    if not marker.is_file():
        return None
    recorded = dict(item.split("=", 1) for item in marker.read_text().split() if "=" in item)
    if recorded.get("version") == str(DEMO_VERSION):
        return None
    return {key: int(recorded[key]) for key in _MARKER_SETTINGS if key in recorded}


def make_demo_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    num_train: int = 240,
    num_val: int = 48,
    size: int = 96,
    partial_seeds: Sequence[int] = PARTIAL_SEEDS,
    layout: str = "pascal",
    num_unlabelled: int = 0,
) -> Path:
    """Generate the synthetic demo dataset under `root` (deterministic in `seed`), written aside and
    renamed into place; returns root. Pascal layout: JPEGImages/{id}.jpg, SegmentationClassAug/{id}.png,
    train_aug.txt, val.txt and the partial labels SegmentationClassAug_{p0,p1,p5,p25}_{s}. Folder layout
    (--dataset folder): images/{train,val}/{id}.jpg, labels/{train,val}/{id}.png, classes.txt,
    dataset.json (the demo's settings), `num_unlabelled` images without masks in unlabelled/, and the
    partial labels labels/train_{p0,..}_{s}/. Both: conditions.json, each image's file stem -> its site's
    nuisance levels (DEMO_SITES, docs/demo.md)."""
    root = Path(root)
    if num_train < 1 or num_val < 1 or size < 16 or num_unlabelled < 0:
        raise DataError(
            f"the demo dataset needs --num_train >= 1, --num_val >= 1, --size >= 16 and "
            f"--num_unlabelled >= 0 (got {num_train}, {num_val}, {size}, {num_unlabelled})"
        )
    if layout not in ("pascal", FOLDER) or (layout == "pascal" and num_unlabelled):
        raise DataError(
            f"--layout {layout} with --num_unlabelled {num_unlabelled}: the layout is pascal or "
            f"{FOLDER}, and only the {FOLDER} layout has a place for images without masks"
        )
    if root.exists() and any(root.iterdir()) and not (root / _DEMO_MARKER).exists():
        raise DataError(
            f"{root} exists and is not a demo dataset made by this project; pass another "
            f"root folder or delete this one"
        )
    pascal = layout == "pascal"
    class_names = DATASETS["demo"].class_names
    records: dict[str, dict[str, str]] = {}
    with staged_dir(root.parent, root.name) as tmp:
        ids = {
            "train_aug": [f"train_{i:05d}" for i in range(num_train)],
            "val": [f"val_{i:05d}" for i in range(num_val)],
            "unlabelled": [f"unlabelled_{i:05d}" for i in range(num_unlabelled)],
        }
        for split_code, (split, split_ids) in enumerate(ids.items()):
            sub = split.removesuffix("_aug")
            image_dir = tmp / (
                "JPEGImages" if pascal else UNLABELLED_DIR if sub == "unlabelled" else f"images/{sub}"
            )
            label_dir = (
                None if sub == "unlabelled" else tmp / ("SegmentationClassAug" if pascal else f"labels/{sub}")
            )
            if split_ids:  # no empty folder: an empty unlabelled/ is an error for --dataset folder
                image_dir.mkdir(parents=True, exist_ok=True)
            if split_ids and label_dir:
                label_dir.mkdir(parents=True, exist_ok=True)
            for i, sample_id in enumerate(split_ids):
                site = DEMO_SITES[i % len(DEMO_SITES)]
                records[sample_id] = site._asdict()
                image, label = _demo_sample(
                    np.random.default_rng([seed, split_code, i]), size, site, class_names
                )
                Image.fromarray(image).save(image_dir / f"{sample_id}.jpg", quality=95)
                if label_dir:
                    write_png(label_dir / f"{sample_id}.png", label)
            if pascal and split_ids:
                (tmp / f"{split}.txt").write_text("\n".join(split_ids) + "\n", encoding="utf-8")
        if pascal:
            label_files = sorted((tmp / "SegmentationClassAug").glob("*.png"))
            write_partial_labels(label_files, tmp, "SegmentationClassAug_{partial}_{seed}", partial_seeds)
        else:
            _write_demo_card(tmp)
            label_files = sorted((tmp / "labels" / "train").glob("*.png"))
            write_partial_labels(label_files, tmp / "labels", FOLDER_PARTIAL_FORMAT, partial_seeds)
        lines = ",\n".join(f"  {json.dumps(i)}: {json.dumps(record)}" for i, record in records.items())
        (tmp / DEMO_CONDITIONS).write_text("{\n" + lines + "\n}\n", encoding="utf-8")
        settings = {
            "version": DEMO_VERSION,
            "seed": seed,
            "num_train": num_train,
            "num_val": num_val,
            "size": size,
        }
        (tmp / _DEMO_MARKER).write_text(" ".join(f"{key}={value}" for key, value in settings.items()) + "\n")
        replace_dir(tmp, root)
    return root


def _write_demo_card(root: Path) -> None:
    """classes.txt (names and colours) and dataset.json (sizes, training defaults) of the demo's entry."""
    demo = DATASETS["demo"]
    lines = [f"{name} {' '.join(map(str, demo.palette[c]))}" for c, name in enumerate(demo.class_names)]
    (root / CLASSES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = {
        "crop_size": list(demo.crop_size),
        "eval_size": list(demo.eval_size),
        "scale_range": list(demo.scale_range),
        "batch_size": demo.batch_size,
        "min_classes": demo.min_classes,
        "epochs": demo.epochs,
        "iters_per_epoch": demo.iters_per_epoch,
        "resnet_depth": demo.resnet_depth,
        "pretrained": demo.pretrained,
    }
    entries = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in settings.items())
    (root / OVERRIDES_FILE).write_text("{\n" + entries + "\n}\n")


# --- preprocessing helpers (dataset/*_preprocess.py) ---


def _resize_one(job: tuple[Path, Path, tuple[int, int], int, str | None]) -> None:
    src, dst, size, resample, mode = job
    try:
        with Image.open(src) as img:
            img = img.convert(mode) if mode else img
            img.resize(size, resample).save(dst)
    except OSError as err:
        raise DataError(f"cannot read {src}: {err}; re-download or replace the file") from None


def resize_files(
    pairs: Sequence[tuple[Path, Path]],
    size: tuple[int, int],
    resample: int,
    mode: str | None = None,
    workers: int = 1,
    desc: str = "resizing",
) -> None:
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

"""Data: the dataset table, reading image and label files, the segmentation dataset and its loaders."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset_card import CLASSES_FILE, HELP, read_card
from faults import ignore_stop_signals, kill_loader_workers_at_exit
from helpers import DataError, stream_seed
from module_list import IGNORE_INDEX
from transforms import normalise, pad_to, random_transform

# Void value of label files on disk; it becomes IGNORE_INDEX in tensors.
VOID = 255
REPO_ROOT = Path(__file__).resolve().parent
PARTIAL_SETTINGS = ("p0", "p1", "p5", "p25")
SPLITS = ("train", "test")
# Label-table entry for raw values that are neither a class nor void, so one vectorised test finds them.
_INVALID = 254
# A dataset described by its folder: images/{train,val}/, labels/{train,val}/, unlabelled/, classes.txt.
FOLDER = "folder"
_FOLDER_SPLITS = {"train": "train", "test": "val"}
UNLABELLED_DIR = "unlabelled"  # images with no masks at all; their ids are 'unlabelled/<file name>'
# Image files read from a folder (any case): a folder dataset's images, predict.py's folders and globs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
LABEL_SUFFIXES = (".png", ".PNG")  # tools on Windows write upper-case suffixes


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


class Sampler(enum.Enum):
    """How splits.get_split draws a label budget from a dataset's training images."""

    BALANCED = "balanced"  # the reference's Pascal and Cityscapes loop: images of >= min_classes classes
    BALANCED_RETIRING = "balanced, retiring"  # the same; a class that no image left holds stops counting
    SUN = "sun"  # the reference's SUN loop: from the image lists of the least-seen classes, no minimum


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything that differs between datasets. Sizes are (H, W); batch_size is per branch in semi mode."""

    name: str
    layout: str  # folder layout on disk: 'pascal' (also the demo), 'cityscapes', 'sun' or 'folder'
    class_names: tuple[str, ...]
    palette: np.ndarray  # uint8 [256, 3]; row 255 paints void / ignore
    label_table: np.ndarray  # uint8 [257]: raw label file value -> class id, VOID, or _INVALID
    crop_size: tuple[int, int]
    eval_size: tuple[int, int] | None  # None: a folder dataset without val images (it cannot be evaluated)
    scale_range: tuple[float, float]
    batch_size: int
    min_classes: int  # classes a labelled image must hold (0: no minimum)
    partial_labels: bool
    setup_hint: str  # how a user gets the data, quoted by errors
    sampler: Sampler = Sampler.BALANCED
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
                   "`python dataset/pascal_preprocess.py` (docs/datasets.md)"),
    "cityscapes": DatasetInfo(
        name="cityscapes", layout="cityscapes", class_names=_CITYSCAPES_NAMES,
        palette=_palette(_CITYSCAPES_COLOURS, 0), label_table=_label_table(_CITYSCAPES_TRAIN_IDS, VOID),
        crop_size=(512, 512), eval_size=(512, 1024), scale_range=(1.0, 1.0), batch_size=2, min_classes=12,
        partial_labels=True,
        setup_hint="put leftImg8bit_trainvaltest/ and gtFine_trainvaltest/ in dataset/ and run "
                   "`python dataset/cityscapes_preprocess.py` (docs/datasets.md)"),
    "sun": DatasetInfo(
        name="sun", layout="sun", class_names=_SUN_NAMES, palette=_palette(_SUN_COLOURS, 0),
        label_table=_label_table({0: VOID, **{v: v - 1 for v in range(1, 38)}}, _INVALID),
        crop_size=(321, 321), eval_size=(385, 513), scale_range=(0.5, 1.5), batch_size=5, min_classes=0,
        partial_labels=False,
        setup_hint="put SUNRGBD-{train,test}_images/ and sunrgbd_train_test_labels/ in dataset/sun and run "
                   "`python dataset/sun_preprocess.py` (docs/datasets.md)", sampler=Sampler.SUN),
    "demo": DatasetInfo(
        name="demo", layout="pascal", class_names=_DEMO_NAMES, palette=_palette(_voc_colours(5), 255),
        label_table=_identity_table(5), crop_size=(65, 65), eval_size=(97, 97), scale_range=(0.75, 1.25),
        batch_size=4, min_classes=2, partial_labels=True,
        setup_hint="generate it with `python dataset/demo_preprocess.py`",
        epochs=8, iters_per_epoch=25, resnet_depth=18, pretrained="none"),
}


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """The table entry of a dataset name (DataError naming the valid ones otherwise); `root` is the data
    folder (--data_root), which a dataset described by its folder reads its card from."""
    if name == FOLDER:
        return _folder_info(root)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (--dataset): choose one of {', '.join(DATASETS)} or {FOLDER} "
                        f"(your own data: --dataset {FOLDER} --data_root DIR)")
    return DATASETS[name]


def _folder_info(root: str | Path | None) -> DatasetInfo:
    """The table entry of the dataset in folder `root`, read from its card (classes.txt, dataset.json)."""
    if root is None:
        raise DataError(f"--dataset {FOLDER} needs --data_root DIR: the folder holding images/, labels/ and "
                        f"{CLASSES_FILE} ({HELP})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_root {root} is not a folder: pass the folder holding images/, labels/ and "
                        f"{CLASSES_FILE} ({HELP})")
    card = read_card(root)
    n = len(card.class_names)
    eval_size = card.eval_size or _largest_size(root / "images" / "val")
    return DatasetInfo(
        name=FOLDER, layout=FOLDER, class_names=card.class_names,
        palette=_palette(card.colours or _voc_colours(n), 255),
        label_table=_label_table({**{c: c for c in range(n)}, card.void: VOID}, _INVALID), crop_size=card.crop_size,
        eval_size=eval_size, scale_range=card.scale_range, batch_size=card.batch_size, min_classes=card.min_classes,
        partial_labels=True,
        setup_hint=f"{HELP} describes the layout of {root}; partial labels come from "
                   f"`python dataset/folder_preprocess.py --root {root}`",
        sampler=Sampler.BALANCED_RETIRING,  # own data may hold a rare class, which would end the split
        epochs=card.epochs, iters_per_epoch=card.iters_per_epoch, resnet_depth=card.resnet_depth,
        pretrained=card.pretrained)


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
    if info.layout == FOLDER:
        return _folder_ids(info, root, split)
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
    ids = path.read_text(encoding="utf-8").split()
    if not ids:
        raise DataError(f"id list {path} is empty: regenerate it ({info.setup_hint})")
    return [str(int(i)) for i in ids] if info.layout == "sun" else ids


def image_path(info: DatasetInfo, root: str | Path, image_id: str, split: str) -> Path:
    """Path of an image file in the reference's preprocessed layout."""
    root = Path(root)
    if info.layout == FOLDER:
        return root / image_id if has_no_mask(info, image_id) else root / "images" / _FOLDER_SPLITS[split] / image_id
    if info.layout == "pascal":
        return root / "JPEGImages" / f"{image_id}.jpg"
    if info.layout == "cityscapes":
        return root / "images" / ("train" if split == "train" else "val") / f"{image_id}.png"
    return root / f"SUNRGBD-{split}_images" / f"img-{int(image_id):06d}.jpg"


def check_partial(info: DatasetInfo, partial: str | None) -> None:
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
    check_partial(info, partial)
    suffix = f"_{partial}_{partial_seed}" if partial else ""
    root = Path(root)
    if info.layout == "pascal":
        return root / f"SegmentationClassAug{suffix}" / f"{image_id}.png"
    if info.layout in ("cityscapes", FOLDER):  # a folder dataset's ids are image file names: the label has its stem
        if partial and split != "train":
            raise ValueError("partial labels exist for the train split only")
        path = root / "labels" / (("train" if split == "train" else "val") + suffix) / f"{Path(image_id).stem}.png"
        return _upper_case_png(path) if info.layout == FOLDER else path
    return root / "sunrgbd_train_test_labels" / f"img-{int(image_id):06d}.png"


def _float_image(path: Path) -> DataError:
    """PIL would clip a float image's values to 0..255 (data in 0..1 would read as black): ask for integers."""
    return DataError(f"image {path} holds 32-bit floats, whose range is unknown: save it as an 8- or 16-bit "
                     f"image (scaled to 0..255 or 0..65535)")


def _too_large(path: Path, error: Exception) -> DataError:
    return DataError(f"image {path} is too large to decode safely ({error}): cut it into tiles (e.g. 2048x2048 "
                     f"pixels, its mask likewise) and use the tiles")


def _open(path: Path, what: str, hint: str) -> Image.Image:
    """Open and decode an image file, turning every failure into one DataError naming the file."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing: the id list and the data folder disagree; {hint}") from None
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode {what} {path} ({error}): the file is corrupt; replace it ({hint})") from None


def read_image(info: DatasetInfo, path: Path) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3]; 16-bit grey is scaled to 8 bits (PIL's convert would clip it)."""
    image = _open(path, "image", info.setup_hint)
    if image.mode == "F":
        raise _float_image(path)
    if image.mode.startswith("I"):
        grey = np.clip(np.asarray(image, np.float32) / 257, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))


def read_label_values(path: Path, hint: str) -> np.ndarray:
    """The raw values of a single-channel label PNG (grayscale or palette: the stored indices), [H, W]: uint8,
    or uint16 for 16/32-bit files with every value above 255 clipped to 256; errors name the file and `hint`."""
    image = _open(path, "label", hint)
    if image.mode == "1":  # a 1-bit PNG: black is 0, white is 1
        return np.asarray(image, np.uint8)
    if image.mode in ("LA", "RGB", "RGBA"):  # a grey mask that a tool saved with colour or alpha channels
        channels = np.asarray(image)[..., : 1 if image.mode == "LA" else 3]
        if not (channels == channels[..., :1]).all():
            raise DataError(f"label {path} is an {image.mode} image of colours: labels must be single-channel PNGs "
                            f"(grayscale or palette) holding class indices; convert each colour to its class index")
        return np.ascontiguousarray(channels[..., 0])
    if image.mode not in ("L", "P") and not image.mode.startswith("I"):
        raise DataError(f"label {path} is a {image.mode} image: labels must be single-channel PNGs "
                        f"(grayscale or palette) holding class indices; convert it to indices")
    raw = np.asarray(image)
    return raw if raw.dtype == np.uint8 else np.clip(raw, 0, 256).astype(np.uint16)


def read_label(info: DatasetInfo, path: Path) -> np.ndarray:
    """A label PNG of a dataset as uint8 [H, W] of class ids / VOID (its raw values mapped by the table)."""
    raw = read_label_values(path, info.setup_hint)
    label = info.label_table[raw]
    invalid = label == _INVALID
    if invalid.any():
        values = np.unique(raw[invalid])[:8].tolist()
        void = "/".join(map(str, void_values(info)))
        fix = (f"name every class of your masks in {CLASSES_FILE}, one a line (line k is value k from 0), or "
               f"relabel those pixels ({HELP})" if info.layout == FOLDER
               else f"is it the right dataset, preprocessed? ({info.setup_hint})")
        raise DataError(f"label {path} holds values {values} that are neither a class of --dataset {info.name} "
                        f"(0..{info.num_classes - 1}) nor void {void}: {fix}")
    return label


def void_values(info: DatasetInfo) -> list[int]:
    """The raw label-file values that mean void (unlabelled pixels) in a dataset."""
    return np.flatnonzero(info.label_table[:256] == VOID).tolist()


def present_classes(label: np.ndarray, void_values: Collection[int] = (VOID,)) -> np.ndarray:
    """Values present in label [H, W], ascending, without the void values."""
    present = np.flatnonzero(np.bincount(label.ravel()))
    return present[~np.isin(present, list(void_values))]


# ---------------------------------------------------------------------------------------------
# A dataset described by its folder: listing and checking its files before any training
# ---------------------------------------------------------------------------------------------


def has_no_mask(info: DatasetInfo, image_id: str) -> bool:
    """Whether an id is an image of a folder dataset's unlabelled/ (no mask at all)."""
    return info.layout == FOLDER and image_id.startswith(f"{UNLABELLED_DIR}/")


def _is_image_file(path: Path) -> bool:
    """An image file by its name: an image suffix (any case), not hidden (macOS leaves ._<name> files and
    __MACOSX/ folders of them)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _listing(folder: Path, what: str) -> dict[str, Path]:
    """Stem -> file of the image files in a folder of a folder dataset; DataError if it is missing or empty,
    or if two files share a stem (labels are matched to images by stem)."""
    if not folder.is_dir():
        beside = ", ".join(sorted(p.name for p in folder.parent.iterdir() if p.is_dir())) \
            if folder.parent.is_dir() else ""  # 'valid' or 'Train' instead of 'val' or 'train'
        raise DataError(f"{folder} not found{f' (its folder holds: {beside})' if beside else ''}: a folder dataset "
                        f"holds images/train/, labels/train/, images/val/ and labels/val/ ({HELP})")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and any(map(_is_image_file, path.rglob("*"))):
            raise DataError(f"{path} is a subfolder: the {what}s of a folder dataset are read from directly inside "
                            f"{folder}, so these would be left out; move its files up into {folder} (every file "
                            f"stem must stay unique)")
        if not _is_image_file(path):
            continue
        if path.stem in files:
            raise DataError(f"{path} and {files[path.stem].name} share the stem {path.stem!r}: {what}s are matched "
                            f"by file stem; rename or remove one")
        files[path.stem] = path
    if not files:
        raise DataError(f"{folder} holds no {what} files ({' '.join(IMAGE_SUFFIXES)}): put the {what}s there "
                        f"({HELP})")
    return files


def _largest_size(folder: Path) -> tuple[int, int] | None:
    """(H, W): the largest height and width of the images in a folder; None without images (predict.py needs only
    the card, and list_ids names the missing folder where images are needed)."""
    files = sorted(filter(_is_image_file, folder.iterdir())) if folder.is_dir() else []
    sizes = [_image_size(path)[::-1] for path in files]
    return (max(h for h, _ in sizes), max(w for _, w in sizes)) if sizes else None


def _upper_case_png(path: Path) -> Path:
    """A label file <stem>.png, or <stem>.PNG where only that one exists."""
    upper = path.with_suffix(".PNG")
    return upper if not path.exists() and upper.exists() else path


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file, read from its header only."""
    try:
        with Image.open(path) as image:
            if image.mode == "F":
                raise _float_image(path)
            return image.size
    except Image.DecompressionBombError as error:
        raise _too_large(path, error) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({error}): the file is corrupt or not an image; replace or "
                        f"remove it") from None


_checked_folders: set[tuple] = set()  # (files and their modification times, label table, eval size) checked


def _folder_ids(info: DatasetInfo, root: Path, split: str) -> list[str]:
    """The image file names of a split of a folder dataset, sorted, after checking that every image has a
    label of the same stem and size (and the reverse) and that every label holds only classes and void."""
    sub = _FOLDER_SPLITS[split]
    image_dir, label_dir = root / "images" / sub, root / "labels" / sub
    images, labels = _listing(image_dir, "image"), _listing(label_dir, "label")
    for stem, path in labels.items():
        if path.suffix not in LABEL_SUFFIXES:  # label_path asks for <stem>.png or <stem>.PNG
            raise DataError(f"label {path} is not a .png file: save it as {path.stem}.png (PNG keeps class values "
                            f"exact)")
        if stem not in images:
            raise _unmatched_label(path, images, image_dir)
    for stem, path in images.items():
        if stem not in labels:
            raise DataError(f"image {path} has no label {label_dir / stem}.png: add the label, or move the image "
                            f"to {root / UNLABELLED_DIR}/ (images without masks)")
    eval_size = info.eval_size if split == "test" else None
    key = (tuple((str(p.resolve()), p.stat().st_mtime_ns) for p in [*images.values(), *labels.values()]),
           info.label_table.tobytes(), eval_size)
    if key not in _checked_folders:
        present = np.zeros(256, bool)  # class ids (and VOID) that some label of the split holds
        for stem in tqdm(sorted(images), desc=f"checking {label_dir}", disable=len(images) < 500, leave=False):
            width, height = _image_size(images[stem])
            label = read_label(info, labels[stem])
            present |= np.bincount(label.ravel(), minlength=256) > 0
            if label.shape != (height, width):
                turned = (" (its sides are swapped: a photo with an EXIF orientation tag, shown upright where it "
                          "was labelled? Store it upright, e.g. with PIL.ImageOps.exif_transpose)"
                          if label.shape == (width, height) else "")
                raise DataError(f"label {labels[stem]} is {label.shape[1]}x{label.shape[0]} but its image "
                                f"{images[stem].name} is {width}x{height} (WxH): a label has its image's size"
                                f"{turned}")
            if eval_size and (height > eval_size[0] or width > eval_size[1]):
                raise DataError(f"image {images[stem]} is {width}x{height} (WxH), larger than the eval_size "
                                f"{eval_size[1]}x{eval_size[0]} of {root / 'dataset.json'}: raise eval_size "
                                f"(or drop it: the default is the largest val image)")
        if split == "train":
            _check_class_coverage(info, label_dir, present)
        _checked_folders.add(key)
    return sorted(path.name for path in images.values())


def _unmatched_label(path: Path, images: dict[str, Path], image_dir: Path) -> DataError:
    """The error of a label without an image of its stem, saying which file it probably belongs to."""
    stem = path.stem
    unread = sorted(p.name for p in image_dir.iterdir() if p.stem == stem and not p.is_dir())
    # tools often name masks <image stem>_mask, _segmentation or <image name>.png
    prefixed = max((other for other in images if stem.startswith(other) and stem[len(other)] in "_-. "), key=len,
                   default=None)
    if unread:
        fix = f"{unread[0]} is not a format read here ({' '.join(IMAGE_SUFFIXES)}): convert it, e.g. to PNG"
    elif prefixed:
        fix = (f"its name starts with that of image {images[prefixed].name}: rename it {prefixed}.png (labels are "
               f"matched to images by the whole file stem)")
    else:
        fix = "add the image or remove the label"
    return DataError(f"label {path} has no image of the same stem in {image_dir}: {fix}")


def _check_class_coverage(info: DatasetInfo, label_dir: Path, present: np.ndarray) -> None:
    """DataError if the training labels hold fewer than two classes (a 0/255 mask read as background and void
    looks like this), a warning for each class they never show (the network cannot learn it)."""
    classes = np.flatnonzero(present[: info.num_classes])
    names = [f"{c} ({info.class_names[c]!r})" for c in range(info.num_classes)]
    [void] = void_values(info)
    if len(classes) < 2:
        held = f"only class {names[classes[0]]}" if len(classes) else "no class"
        raise DataError(f"the labels in {label_dir} hold {held}{f' and void {void}' if present[VOID] else ''}: "
                        f"there is nothing to tell apart. Mask values are the line of the class in "
                        f"{CLASSES_FILE}, counted from 0, and {void} is void: a 0/{void} mask whose {void} marks "
                        f"the object must store it as 1 ({HELP})")
    missing = [names[c] for c in range(info.num_classes) if not present[c]]
    if missing:
        print(f"warning: no label in {label_dir} holds class {', '.join(missing)} of {CLASSES_FILE}: the network "
              f"cannot learn {'it' if len(missing) == 1 else 'them'}; add training images that show "
              f"{'it' if len(missing) == 1 else 'them'}", file=sys.stderr, flush=True)


def list_unlabelled(info: DatasetInfo, root: str | Path) -> list[str]:
    """Ids of the images without masks (a folder dataset's unlabelled/), which join the unlabelled pool."""
    folder = Path(root) / UNLABELLED_DIR
    if info.layout != FOLDER or not folder.is_dir():
        return []
    files = sorted(_listing(folder, "image").values())
    for path in files:
        _image_size(path)
    return [f"{UNLABELLED_DIR}/{path.name}" for path in files]


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
        check_partial(info, partial)
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
        image = read_image(self.info, image_path(self.info, self.root, image_id, self.split))
        if has_no_mask(self.info, image_id):  # every pixel ignore: such a label only feeds the monitors
            label = np.full(image.shape[:2], VOID, np.uint8)
        else:
            path = label_path(self.info, self.root, image_id, self.split, self.partial, self.partial_seed)
            label = read_label(self.info, path)
            if image.shape[:2] != label.shape:
                raise DataError(f"label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
                                f"{image.shape[1]}x{image.shape[0]} (WxH): re-run the preprocessing "
                                f"({self.info.setup_hint})")
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


class EpochBatchSampler(torch.utils.data.Sampler):
    """iters_per_epoch batches of (index, sample_seed) pairs drawn with replacement; a pure function of
    (seed, epoch, rank), so it does not depend on the number of workers."""

    def __init__(self, num_items: int, batch_size: int, iters_per_epoch: int, seed: int = 0, rank: int = 0):
        if num_items < 1:
            raise DataError("the training set is empty: check the id list / split")
        self.num_items, self.batch_size, self.iters = num_items, batch_size, iters_per_epoch
        self.seed, self.rank, self.epoch, self.start = seed, rank, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch `epoch`'s batches, skipping its first `start` (already trained on before a stop)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(stream_seed("batches", self.seed, self.epoch, self.rank))
        index = torch.randint(self.num_items, (self.iters, self.batch_size), generator=generator)
        seeds = torch.randint(2**62, (self.iters, self.batch_size), generator=generator)
        for row_index, row_seed in zip(index[self.start:].tolist(), seeds[self.start:].tolist()):
            yield list(zip(row_index, row_seed))

    def __len__(self) -> int:
        return self.iters - self.start


def loader_workers(requested: int | None, device: torch.device, world_size: int = 1) -> int:
    """Loader worker processes: --num_workers, else up to 8 per process on CUDA and none on a CPU, whose step
    needs the cores. 8 feed a 10 + 10 semi step at 321^2 (bench/dataloader.py: 4 workers 107, 8 workers 210
    crops/s on a 16-core H100 machine; a loader needs 100 at a 0.10 s step)."""
    if requested is not None:
        return requested
    return max(1, min(8, (os.cpu_count() or 1) // world_size)) if device.type == "cuda" else 0


def _worker_options(num_workers: int, pin_memory: bool) -> dict:
    """DataLoader options shared by the loaders: workers kept across epochs that leave stop signals to the
    training process (faults.ignore_stop_signals), which therefore kills any still alive at its exit."""
    if num_workers:
        kill_loader_workers_at_exit()
    return dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                worker_init_fn=ignore_stop_signals)


class TrainLoader:
    """A DataLoader over an EpochBatchSampler: len() batches per epoch; call set_epoch(e) before epoch e."""

    def __init__(self, dataset: SegmentationDataset, sampler: EpochBatchSampler, num_workers: int, seed: int,
                 pin_memory: bool):
        self.dataset, self.sampler = dataset, sampler
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, **_worker_options(num_workers, pin_memory),
            # seeds the workers' torch, numpy and random streams: distinct per worker, reproducible per run
            generator=torch.Generator().manual_seed(stream_seed("loader workers", seed, sampler.rank)))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

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
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=shard,
                                       **_worker_options(num_workers, pin_memory))


def color_map(label: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Paint a label map [H, W] with a palette [256, 3]: uint8 [H, W, 3]; IGNORE_INDEX / VOID use row 255."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label).astype(np.int64)
    return palette[np.where(label < 0, VOID, np.minimum(label, 255))]



"""The dataset table: what each dataset is (classes, palette, label values, sizes, training defaults), the
built-in entries and a folder dataset's, and painting a label map with a palette."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from dataset_card import CLASSES_FILE, HELP, DatasetCard
from helpers import DataError

# Void value of label files on disk; it becomes IGNORE_INDEX in tensors.
VOID = 255
REPO_ROOT = Path(__file__).resolve().parent
PARTIAL_SETTINGS = ("p0", "p1", "p5", "p25")
# Label-table entry for raw values that are neither a class nor void, so one vectorised test finds them.
INVALID = 254
# A dataset described by its folder: images/{train,val}/, labels/{train,val}/, unlabelled/, classes.txt.
FOLDER = "folder"
UNLABELLED_DIR = "unlabelled"  # images with no masks at all; their ids are 'unlabelled/<file name>'


def _voc_colours(n: int) -> list[tuple[int, int, int]]:
    """Pascal VOC colours: a class index's bits are spread, three at a time, over the high bits of R, G, B."""
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
    return _label_table({**{c: c for c in range(num_classes)}, VOID: VOID}, INVALID)


_CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
_CITYSCAPES_COLOURS = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]
_SUN_COLOURS = [
    (148, 65, 137),
    (255, 116, 69),
    (86, 156, 137),
    (202, 179, 158),
    (155, 99, 235),
    (161, 107, 108),
    (133, 160, 103),
    (76, 152, 126),
    (84, 62, 35),
    (44, 80, 130),
    (31, 184, 157),
    (101, 144, 77),
    (23, 197, 62),
    (141, 168, 145),
    (142, 151, 136),
    (115, 201, 77),
    (100, 216, 255),
    (57, 156, 36),
    (88, 108, 129),
    (105, 129, 112),
    (42, 137, 126),
    (155, 108, 249),
    (166, 148, 143),
    (81, 91, 87),
    (100, 124, 51),
    (73, 131, 121),
    (157, 210, 220),
    (134, 181, 60),
    (221, 223, 147),
    (123, 108, 131),
    (161, 66, 179),
    (163, 221, 160),
    (31, 146, 98),
    (99, 121, 30),
    (49, 89, 240),
    (116, 108, 9),
    (161, 176, 169),
]
_PASCAL_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_CITYSCAPES_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
_SUN_NAMES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "fridge",
    "tv",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
)
# The demo's classes, each a texture on a shape: '<texture>_<shape>' (the generator draws them by name).
_DEMO_NAMES = (
    "background",
    "striped_disc",
    "checked_square",
    "dotted_triangle",
    "plain_cross",
    "ringed_star",
    "speckled_ring",
)


@dataclass(frozen=True)
class OnlineDefaults:
    """The values FixMatch and UniMatch (--method fixmatch|unimatch) train with where a flag of the same name
    is left unset: UniMatch's configs for Pascal and Cityscapes, Pascal-like values elsewhere. Their
    iterations per epoch follow the unlabelled images (options.online_iterations)."""

    crop_size: tuple[int, int]  # square
    batch_size: int  # per branch (labelled, unlabelled) and process
    lr: float  # the backbone's; the rest of the network trains at lr * lr_multi
    lr_multi: float
    epochs: int
    conf_thresh: float  # tau: pseudo-labels below this confidence are not learnt from
    criterion: str = "ce"  # the labelled loss: 'ce' or 'ohem'
    weight_decay: float = 1e-4


# The flags whose defaults follow --method (the mean teacher's are the reference's).
ONLINE_DEFAULTED = (*(f.name for f in fields(OnlineDefaults)), "iters_per_epoch")
PASCAL_LIKE = OnlineDefaults(
    crop_size=(321, 321), batch_size=8, lr=0.001, lr_multi=10.0, epochs=80, conf_thresh=0.95
)


class Sampler(enum.Enum):
    """How splits.get_split draws a label budget from a dataset's training images."""

    BALANCED = "balanced"  # the reference's Pascal and Cityscapes loop: images of >= min_classes classes
    BALANCED_RETIRING = "balanced, retiring"  # the same; a class that no image left holds stops counting
    SUN = "sun"  # the reference's SUN loop: from the image lists of the least-seen classes, no minimum


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything that differs between datasets. Sizes are (H, W); batch_size is per branch in semi mode."""

    name: str
    layout: str  # a key of layouts.LAYOUTS: 'pascal' (also the demo), 'cityscapes', 'sun' or 'folder'
    class_names: tuple[str, ...]
    palette: np.ndarray  # uint8 [256, 3]; row 255 paints void / ignore
    label_table: np.ndarray  # uint8 [257]: raw label file value -> class id, VOID, or INVALID
    crop_size: tuple[int, int]
    eval_size: tuple[int, int] | None  # None: a folder dataset without val images (it cannot be evaluated)
    scale_range: tuple[float, float]
    batch_size: int
    min_classes: int  # classes a labelled image must hold (0: no minimum)
    partial_labels: bool
    setup_hint: str  # how a user gets the data, quoted by errors
    sampler: Sampler = Sampler.BALANCED
    value_fix: str | None = None  # how to fix label values outside the classes (None: see the preprocessing)
    # Training defaults the engine uses for flags left unset (the reference's, but for the demo).
    num_labels: int = 15  # the label budget
    lr: float = 2.5e-3  # sup and the mean teacher (FixMatch and UniMatch: online.lr)
    hue_jitter: float | None = None  # every method's colour jitter (None: the reference's, transforms')
    epochs: int = 200
    iters_per_epoch: int = 200
    resnet_depth: int = 101
    pretrained: str = "imagenet"
    online: OnlineDefaults = PASCAL_LIKE

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {
    "pascal": DatasetInfo(
        name="pascal",
        layout="pascal",
        class_names=_PASCAL_NAMES,
        palette=_palette(_voc_colours(21), 255),
        label_table=_identity_table(21),
        crop_size=(321, 321),
        eval_size=(513, 513),
        scale_range=(0.5, 1.5),
        batch_size=10,
        min_classes=3,
        partial_labels=True,
        setup_hint="put VOC2012 JPEGImages/ and SegmentationClassAug/ in dataset/pascal and run "
        "`python dataset/pascal_preprocess.py` (docs/datasets.md)",
    ),
    "cityscapes": DatasetInfo(
        name="cityscapes",
        layout="cityscapes",
        class_names=_CITYSCAPES_NAMES,
        palette=_palette(_CITYSCAPES_COLOURS, 0),
        label_table=_label_table(_CITYSCAPES_TRAIN_IDS, VOID),
        crop_size=(512, 512),
        eval_size=(512, 1024),
        scale_range=(1.0, 1.0),
        batch_size=2,
        min_classes=12,
        partial_labels=True,
        setup_hint="put leftImg8bit_trainvaltest/ and gtFine_trainvaltest/ in dataset/ and run "
        "`python dataset/cityscapes_preprocess.py` (docs/datasets.md)",
        online=OnlineDefaults(
            crop_size=(801, 801),
            batch_size=8,
            lr=0.005,
            lr_multi=1.0,
            epochs=240,
            conf_thresh=0.0,
            criterion="ohem",
        ),
    ),
    "sun": DatasetInfo(
        name="sun",
        layout="sun",
        class_names=_SUN_NAMES,
        palette=_palette(_SUN_COLOURS, 0),
        label_table=_label_table({0: VOID, **{v: v - 1 for v in range(1, 38)}}, INVALID),
        crop_size=(321, 321),
        eval_size=(385, 513),
        scale_range=(0.5, 1.5),
        batch_size=5,
        min_classes=0,
        partial_labels=False,
        setup_hint="put SUNRGBD-{train,test}_images/ and sunrgbd_train_test_labels/ in dataset/sun and run "
        "`python dataset/sun_preprocess.py` (docs/datasets.md)",
        sampler=Sampler.SUN,
    ),
    "demo": DatasetInfo(
        name="demo",
        layout="pascal",
        class_names=_DEMO_NAMES,
        palette=_palette(_voc_colours(7), 255),
        label_table=_identity_table(7),
        crop_size=(65, 65),
        eval_size=(97, 97),
        scale_range=(0.75, 1.25),
        batch_size=4,
        min_classes=2,
        partial_labels=True,
        setup_hint="generate it with `python dataset/demo_preprocess.py`",
        # few enough labels that supervised training fits them within the schedule, and a learning rate for
        # a network trained from scratch, shared by every method (docs/demo.md)
        num_labels=5,
        lr=0.01,
        # its classes differ in colour: a hue rotation would turn one class's colours into another's
        hue_jitter=0.0,
        epochs=12,
        iters_per_epoch=25,
        resnet_depth=18,
        pretrained="none",
        # a backbone trained from scratch learns as fast as the head: no head multiplier, a larger lr
        online=OnlineDefaults(
            crop_size=(65, 65), batch_size=4, lr=0.01, lr_multi=1.0, epochs=12, conf_thresh=0.95
        ),
    ),
}


def folder_entry(card: DatasetCard, eval_size: tuple[int, int] | None, root: Path) -> DatasetInfo:
    """The table entry of the dataset described by folder `root`: its card and the size it is evaluated at."""
    n = len(card.class_names)
    return DatasetInfo(
        name=FOLDER,
        layout=FOLDER,
        class_names=card.class_names,
        palette=_palette(card.colours or _voc_colours(n), 255),
        label_table=_label_table({**{c: c for c in range(n)}, card.void: VOID}, INVALID),
        crop_size=card.crop_size,
        eval_size=eval_size,
        scale_range=card.scale_range,
        batch_size=card.batch_size,
        min_classes=card.min_classes,
        partial_labels=True,
        setup_hint=f"{HELP} describes the layout of {root}; partial labels come from "
        f"`python dataset/folder_preprocess.py --root {root}`",
        sampler=Sampler.BALANCED_RETIRING,  # own data may hold a rare class, which would end the split
        value_fix=f"name every class of your masks in {CLASSES_FILE}, one a line (line k is value k from 0), "
        f"or relabel those pixels ({HELP})",
        epochs=card.epochs,
        iters_per_epoch=card.iters_per_epoch,
        resnet_depth=card.resnet_depth,
        pretrained=card.pretrained,
        hue_jitter=card.hue_jitter,
        online=replace(PASCAL_LIKE, crop_size=(min(card.crop_size),) * 2, batch_size=card.batch_size),
    )


def check_partial(info: DatasetInfo, partial: str | None) -> None:
    """DataError unless `partial` is None or a partial-label setting of a dataset that has them."""
    if partial is None:
        return
    if not info.partial_labels:
        raise DataError(
            f"--dataset {info.name} has no partial labels (the reference silently trained on full "
            f"labels): drop --partial, or use a dataset with partial labels"
        )
    if partial not in PARTIAL_SETTINGS:
        raise DataError(
            f"--partial {partial!r} is not a partial-label setting: choose one of "
            f"{', '.join(PARTIAL_SETTINGS)}"
        )


def void_values(info: DatasetInfo) -> list[int]:
    """The raw label-file values that mean void (unlabelled pixels) in a dataset."""
    return np.flatnonzero(info.label_table[:256] == VOID).tolist()


def color_map(label: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Paint a label map [H, W] with a palette [256, 3]: uint8 [H, W, 3]; IGNORE_INDEX / VOID use row 255."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label).astype(np.int64)
    return palette[np.where(label < 0, VOID, np.minimum(label, 255))]

"""Where each family of datasets keeps its files: the reference's preprocessed Pascal, Cityscapes and SUN,
and a dataset described by its folder (listed and checked before any training); resolve_dataset binds
--dataset to its --data_root."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from build_data import IMAGE_SUFFIXES, DatasetFiles, file_stamp, image_size, read_label
from dataset_card import CLASSES_FILE, HELP, OVERRIDES_FILE, DatasetCard, read_card
from dataset_table import (
    DATASETS,
    FOLDER,
    REPO_ROOT,
    UNLABELLED_DIR,
    VOID,
    DatasetInfo,
    folder_entry,
    void_values,
)
from helpers import DataError

_SPLIT_FOLDERS = {"train": "train", "test": "val"}  # the Cityscapes and folder layouts' names of the splits
LABEL_SUFFIXES = (".png", ".PNG")  # tools on Windows write upper-case suffixes


def resolve_dataset(name: str, data_root: str | Path | None = None) -> DatasetFiles:
    """--dataset NAME bound to its data folder --data_root (default dataset/NAME in the repository), where a
    dataset described by its folder reads its card; DataError naming the valid names otherwise."""
    data_root = data_root or None  # an empty --data_root: the default, not the current folder
    if name == FOLDER:
        info = _folder_info(data_root)
    elif name in DATASETS:
        info = DATASETS[name]
    else:
        raise DataError(
            f"unknown dataset {name!r} (--dataset): choose one of {', '.join(DATASETS)} or "
            f"{FOLDER} (your own data: --dataset {FOLDER} --data_root DIR)"
        )
    root = Path(data_root) if data_root is not None else REPO_ROOT / "dataset" / name
    return LAYOUTS[info.layout](info, root)


def _folder_info(root: str | Path | None) -> DatasetInfo:
    """The table entry of the dataset in folder `root`, from its card (classes.txt, dataset.json) and, unless
    the card gives eval_size, the headers of its val images: each read once while unchanged (file_stamp)."""
    if root is None:
        raise DataError(
            f"--dataset {FOLDER} needs --data_root DIR: the folder holding images/, labels/ and "
            f"{CLASSES_FILE} ({HELP})"
        )
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data_root {root} is not a folder: pass the folder holding images/, labels/ and "
            f"{CLASSES_FILE} ({HELP})"
        )
    card = _card(root, root.resolve(), file_stamp(root / CLASSES_FILE), file_stamp(root / OVERRIDES_FILE))
    return folder_entry(card, card.eval_size or _largest_size(root / "images" / "val"), root)


@functools.lru_cache(maxsize=8)
def _card(root: Path, resolved: Path, *stamps: tuple | None) -> DatasetCard:
    """read_card of a folder, kept while its absolute path and the stamps of its card files stay."""
    return read_card(root)


# ---------------------------------------------------------------------------------------------
# The reference's preprocessed layouts
# ---------------------------------------------------------------------------------------------


class _ReferenceFiles(DatasetFiles):
    """A layout of the reference's preprocessed datasets: ids from a list file or from numbered images."""

    def _id_list(self, name: str) -> list[str]:
        """The ids in the list file `name` of the root, or else of the lists shipped in dataset/<name>/."""
        path = self.root / name
        if not path.is_file():  # fall back to the lists shipped with the code
            path = REPO_ROOT / "dataset" / self.info.name / name
        if not path.is_file():
            raise DataError(f"id list {self.root / name} not found: {self.info.setup_hint}")
        ids = path.read_text(encoding="utf-8").split()
        if not ids:
            raise DataError(f"id list {path} is empty: regenerate it ({self.info.setup_hint})")
        return ids

    def _numbered_ids(self, folder: Path, pattern: str) -> list[str]:
        """The numbers ending the stems of `pattern` files in `folder` (img-000012.jpg, 12.png), in order."""
        stems = [p.stem.rsplit("-", 1)[-1] for p in folder.glob(pattern)]
        ids = sorted((s for s in stems if s.isdigit()), key=int)
        if not ids:
            raise DataError(f"no {pattern} images in {folder}: {self.info.setup_hint}")
        return [str(int(s)) for s in ids]


class PascalFiles(_ReferenceFiles):
    """The reference's Pascal VOC layout (the demo's too): JPEGImages/{id}.jpg, SegmentationClassAug/{id}.png
    (partial labels: SegmentationClassAug_{setting}_{seed}/), ids in train_aug.txt and val.txt."""

    def _ids(self, split: str) -> list[str]:
        return self._id_list({"train": "train_aug.txt", "test": "val.txt"}[split])

    def image_path(self, image_id: str, split: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def _label_path(self, image_id: str, split: str, suffix: str) -> Path:
        return self.root / f"SegmentationClassAug{suffix}" / f"{image_id}.png"


def _train_only(split: str, suffix: str) -> None:
    if suffix and split != "train":
        raise ValueError("partial labels exist for the train split only")


class CityscapesFiles(_ReferenceFiles):
    """The reference's preprocessed Cityscapes: images/{train,val}/{i}.png and labels/{train,val}/{i}.png
    (partial labels: labels/train_{setting}_{seed}/), numbered from 0 and listed in numeric order."""

    def _ids(self, split: str) -> list[str]:
        return self._numbered_ids(self.image_path("0", split).parent, "*.png")

    def image_path(self, image_id: str, split: str) -> Path:
        return self.root / "images" / _SPLIT_FOLDERS[split] / f"{image_id}.png"

    def _label_path(self, image_id: str, split: str, suffix: str) -> Path:
        _train_only(split, suffix)
        return self.root / "labels" / (_SPLIT_FOLDERS[split] + suffix) / f"{image_id}.png"

    def renamed_ids(self) -> dict[str, str]:
        """Original train name (city/city_seq_frame) -> preprocessed image number, from the name record."""
        record = name_record_path(self.root, "train")
        if not record.is_file():
            raise DataError(
                f"{record} not found: this preprocessed Cityscapes copy does not record which original file "
                f"each images/train/{{i}}.png is (the reference's download numbers them in unsorted "
                f"file-system order), so a split naming original files (city/city_seq_frame) cannot be "
                f"matched to it; re-run `python dataset/cityscapes_preprocess.py --root {self.root}` on the "
                f"original leftImg8bit_trainvaltest/ and gtFine_trainvaltest/ folders, which writes the "
                f"record"
            )
        return {name: str(i) for i, name in enumerate(record.read_text(encoding="utf-8").split())}


def name_record_path(root: str | Path, folder: str) -> Path:
    """Cityscapes: the record dataset/cityscapes_preprocess.py writes of the original name of every numbered
    image of images/<folder>/ (line i: the stem of i.png, e.g. jena/jena_000078_000019)."""
    return Path(root) / "images" / f"names_{folder}.txt"


class SunFiles(_ReferenceFiles):
    """The reference's preprocessed SUN RGB-D: SUNRGBD-{train,test}_images/img-{id:06d}.jpg and one label
    folder sunrgbd_train_test_labels/; train ids are listed from the images, test ids read from
    test_idx.txt."""

    def _ids(self, split: str) -> list[str]:
        if split == "train":
            return self._numbered_ids(self.image_path("0", split).parent, "img-*.jpg")
        return [str(int(i)) for i in self._id_list("test_idx.txt")]

    def image_path(self, image_id: str, split: str) -> Path:
        return self.root / f"SUNRGBD-{split}_images" / f"img-{int(image_id):06d}.jpg"

    def _label_path(self, image_id: str, split: str, suffix: str) -> Path:
        return self.root / "sunrgbd_train_test_labels" / f"img-{int(image_id):06d}.png"


# ---------------------------------------------------------------------------------------------
# A dataset described by its folder: listing and checking its files before any training
# ---------------------------------------------------------------------------------------------


class FolderFiles(DatasetFiles):
    """A dataset described by its folder: images/{train,val}/<name> and labels/{train,val}/<stem>.png (partial
    labels: labels/train_{setting}_{seed}/), images without masks in unlabelled/; ids are image file names,
    checked (_folder_ids) before any training."""

    def _ids(self, split: str) -> list[str]:
        return _folder_ids(self.info, self.root, split)

    def image_path(self, image_id: str, split: str) -> Path:
        if not self.has_mask(image_id):
            return self.root / image_id
        return self.root / "images" / _SPLIT_FOLDERS[split] / image_id

    def _label_path(self, image_id: str, split: str, suffix: str) -> Path:
        _train_only(split, suffix)  # the label has the stem of its image's file name
        folder = self.root / "labels" / (_SPLIT_FOLDERS[split] + suffix)
        return _upper_case_png(folder / f"{Path(image_id).stem}.png")

    def has_mask(self, image_id: str) -> bool:
        return not image_id.startswith(f"{UNLABELLED_DIR}/")

    def unlabelled_ids(self) -> list[str]:
        folder = self.root / UNLABELLED_DIR
        if not folder.is_dir():
            return []
        files = sorted(_listing(folder, "image").values())
        for path in files:
            image_size(path)
        return [f"{UNLABELLED_DIR}/{path.name}" for path in files]


def _is_image_file(path: Path) -> bool:
    """An image file by its name: an image suffix (any case), not hidden (macOS leaves ._<name> files and
    __MACOSX/ folders of them)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _listing(folder: Path, what: str) -> dict[str, Path]:
    """Stem -> file of the image files in a folder of a folder dataset; DataError if it is missing or empty,
    or if two files share a stem (labels are matched to images by stem)."""
    if not folder.is_dir():
        beside = (
            ", ".join(sorted(p.name for p in folder.parent.iterdir() if p.is_dir()))
            if folder.parent.is_dir()
            else ""
        )  # 'valid' or 'Train' instead of 'val' or 'train'
        raise DataError(
            f"{folder} not found{f' (its folder holds: {beside})' if beside else ''}: a folder "
            f"dataset holds images/train/, labels/train/, images/val/ and labels/val/ ({HELP})"
        )
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and any(map(_is_image_file, path.rglob("*"))):
            raise DataError(
                f"{path} is a subfolder: the {what}s of a folder dataset are read from directly "
                f"inside {folder}, so these would be left out; move its files up into {folder} "
                f"(every file stem must stay unique)"
            )
        if not _is_image_file(path):
            continue
        if path.stem in files:
            raise DataError(
                f"{path} and {files[path.stem].name} share the stem {path.stem!r}: {what}s are "
                f"matched by file stem; rename or remove one"
            )
        files[path.stem] = path
    if not files:
        raise DataError(
            f"{folder} holds no {what} files ({' '.join(IMAGE_SUFFIXES)}): put the {what}s there ({HELP})"
        )
    return files


def _largest_size(folder: Path) -> tuple[int, int] | None:
    """(H, W): the largest height and width of the images in a folder; None without images (predict.py needs
    only the card, and list_ids names the missing folder where images are needed)."""
    files = sorted(filter(_is_image_file, folder.iterdir())) if folder.is_dir() else []
    sizes = [image_size(path)[::-1] for path in files]
    return (max(h for h, _ in sizes), max(w for _, w in sizes)) if sizes else None


def _upper_case_png(path: Path) -> Path:
    """A label file <stem>.png, or <stem>.PNG where only that one exists."""
    upper = path.with_suffix(".PNG")
    return upper if not path.exists() and upper.exists() else path


_checked_folders: set[tuple] = set()  # (files and their stamps, label table, eval size) checked


def _folder_ids(info: DatasetInfo, root: Path, split: str) -> list[str]:
    """The image file names of a split of a folder dataset, sorted, after checking that every image has a
    label of the same stem and size (and the reverse) and that every label holds only classes and void."""
    sub = _SPLIT_FOLDERS[split]
    image_dir, label_dir = root / "images" / sub, root / "labels" / sub
    images, labels = _listing(image_dir, "image"), _listing(label_dir, "label")
    for stem, path in labels.items():
        if path.suffix not in LABEL_SUFFIXES:  # label_path asks for <stem>.png or <stem>.PNG
            raise DataError(
                f"label {path} is not a .png file: save it as {path.stem}.png (PNG keeps class values exact)"
            )
        if stem not in images:
            raise _unmatched_label(path, images, image_dir)
    for stem, path in images.items():
        if stem not in labels:
            raise DataError(
                f"image {path} has no label {label_dir / stem}.png: add the label, or move the "
                f"image to {root / UNLABELLED_DIR}/ (images without masks)"
            )
    eval_size = info.eval_size if split == "test" else None
    key = (
        tuple((str(p.resolve()), file_stamp(p)) for p in [*images.values(), *labels.values()]),
        info.label_table.tobytes(),
        eval_size,
    )
    if key not in _checked_folders:
        present = np.zeros(256, bool)  # class ids (and VOID) that some label of the split holds
        for stem in tqdm(
            sorted(images), desc=f"checking {label_dir}", disable=len(images) < 500, leave=False
        ):
            width, height = image_size(images[stem])
            label = read_label(info, labels[stem])
            present |= np.bincount(label.ravel(), minlength=256) > 0
            if label.shape != (height, width):
                turned = (
                    " (its sides are swapped: a photo with an EXIF orientation tag, shown upright "
                    "where it was labelled? Store it upright, e.g. with PIL.ImageOps.exif_transpose)"
                    if label.shape == (width, height)
                    else ""
                )
                raise DataError(
                    f"label {labels[stem]} is {label.shape[1]}x{label.shape[0]} but its image "
                    f"{images[stem].name} is {width}x{height} (WxH): a label has its image's size"
                    f"{turned}"
                )
            if eval_size and (height > eval_size[0] or width > eval_size[1]):
                raise DataError(
                    f"image {images[stem]} is {width}x{height} (WxH), larger than the eval_size "
                    f"{eval_size[1]}x{eval_size[0]} of {root / OVERRIDES_FILE}: raise eval_size "
                    f"(or drop it: the default is the largest val image)"
                )
        if split == "train":
            _check_class_coverage(info, label_dir, present)
        _checked_folders.add(key)
    return sorted(path.name for path in images.values())


def _unmatched_label(path: Path, images: dict[str, Path], image_dir: Path) -> DataError:
    """The error of a label without an image of its stem, saying which file it probably belongs to."""
    stem = path.stem
    unread = sorted(p.name for p in image_dir.iterdir() if p.stem == stem and not p.is_dir())
    # tools often name masks <image stem>_mask, _segmentation or <image name>.png
    prefixed = max(
        (other for other in images if stem.startswith(other) and stem[len(other)] in "_-. "),
        key=len,
        default=None,
    )
    if unread:
        fix = f"{unread[0]} is not a format read here ({' '.join(IMAGE_SUFFIXES)}): convert it, e.g. to PNG"
    elif prefixed:
        fix = (
            f"its name starts with that of image {images[prefixed].name}: rename it {prefixed}.png "
            f"(labels are matched to images by the whole file stem)"
        )
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
        raise DataError(
            f"the labels in {label_dir} hold {held}{f' and void {void}' if present[VOID] else ''}"
            f": there is nothing to tell apart. Mask values are the line of the class in "
            f"{CLASSES_FILE}, counted from 0, and {void} is void: a 0/{void} mask whose {void} "
            f"marks the object must store it as 1 ({HELP})"
        )
    missing = [names[c] for c in range(info.num_classes) if not present[c]]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        print(
            f"warning: no label in {label_dir} holds class {', '.join(missing)} of {CLASSES_FILE}: the "
            f"network cannot learn {them}; add training images that show {them}",
            file=sys.stderr,
            flush=True,
        )


LAYOUTS: dict[str, type[DatasetFiles]] = {
    "pascal": PascalFiles,
    "cityscapes": CityscapesFiles,
    "sun": SunFiles,
    FOLDER: FolderFiles,
}

"""Label budgets: the reference's class-balanced samplers (pure functions of ids, class sets, budget and
seed) and split folders (labelled.txt / unlabelled.txt)."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from build_data import DataError, DatasetFiles, file_stamp, present_classes, read_label
from dataset_table import REPO_ROOT, Sampler
from helpers import UserError, atomic_save
from layouts import name_record_path

ClassSets = Mapping[str, Collection[int]] | Callable[[str], Collection[int]]
SHIPPED_SPLITS = REPO_ROOT / "dataset" / "splits"  # the field's standard splits (dataset/splits/README.md)
SPLIT_FILES = ("labelled.txt", "unlabelled.txt")  # a split folder: ids one a line


def _budget_error(num_labels: int, got: int, why: str) -> DataError:
    return DataError(
        f"cannot pick {num_labels} labelled images: {why} (picked {got}); pass a smaller "
        f"--num_labels, or --num_labels 0 to use every training image"
    )


def select_labelled(
    ids: Sequence[str],
    class_sets: ClassSets,
    num_labels: int,
    seed: int,
    num_classes: int,
    min_classes: int,
    retire_missing: bool = False,
) -> tuple[list[str], list[str]]:
    """The reference's class-balanced greedy split (Pascal, Cityscapes): returns (labelled ids in selection
    order, the other ids in list order). `class_sets` maps an id to its classes (void excluded); it is
    called lazily and may be called again for the same id. With retire_missing (own data, where a class may be
    rare or absent), least-seen classes that no remaining image holds stop counting instead of ending the
    split; the picks are the reference's until that point."""
    classes_of = class_sets if callable(class_sets) else class_sets.__getitem__
    if not 0 <= num_labels <= len(ids):
        raise _budget_error(num_labels, 0, f"the training list has {len(ids)} images")
    work = list(ids)
    random.Random(seed).shuffle(work)  # the only random draw, as random.seed(seed); random.shuffle(...)
    counter = [0] * num_classes
    active = set(range(num_classes))  # the classes that count in the balance
    least_seen = set(active)
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
                held = set()  # the classes of the images that could still be picked
                if retire_missing and labelled:
                    held = set().union(
                        *(classes_of(i) for i in work + rejected if len(classes_of(i)) >= min_classes)
                    )
                if not held:
                    need = (
                        f" including one of the least-seen classes {sorted(least_seen)}"
                        if labelled and not retire_missing
                        else ""
                    )
                    raise _budget_error(
                        num_labels, len(labelled), f"no remaining image has >= {min_classes} classes{need}"
                    )
                active &= held
                failed.clear()
        fewest = min(counter[c] for c in active)
        least_seen = {c for c in active if counter[c] == fewest}
    chosen = set(labelled)
    return labelled, [i for i in ids if i not in chosen]


def select_labelled_sun(
    ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int, num_classes: int
) -> tuple[list[str], list[str]]:
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


def get_split(data: DatasetFiles, num_labels: int, seed: int) -> tuple[list[str], list[str]]:
    """(labelled ids, unlabelled ids) of the training set for a label budget; 0 -> (all ids, all ids)."""
    info = data.info
    ids = data.list_ids("train")
    if num_labels == 0:
        return list(ids), list(ids)
    cache: dict[str, frozenset[int]] = {}

    def classes_of(i: str) -> frozenset[int]:  # read_label rejects values outside the classes
        if i not in cache:
            label = read_label(info, data.label_path(i, "train"))
            cache[i] = frozenset(present_classes(label).tolist())
        return cache[i]

    if info.sampler is Sampler.SUN:
        return select_labelled_sun(ids, classes_of, num_labels, seed, info.num_classes)
    return select_labelled(
        ids,
        classes_of,
        num_labels,
        seed,
        info.num_classes,
        info.min_classes,
        retire_missing=info.sampler is Sampler.BALANCED_RETIRING,
    )


def _split_text(split_ids: Sequence[str]) -> str:
    return "".join(f"{i}\n" for i in split_ids)


def write_split_dir(path: str | os.PathLike, labelled: Sequence[str], unlabelled: Sequence[str]) -> None:
    """Write path/labelled.txt and path/unlabelled.txt, one id per line."""
    for name, split_ids in zip(SPLIT_FILES, (labelled, unlabelled)):
        text = _split_text(split_ids)
        atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), Path(path) / name)


def split_digest(labelled: Sequence[str], unlabelled: Sequence[str]) -> str:
    """sha256 hex of labelled.txt + '\\n--\\n' + unlabelled.txt as write_split_dir writes them."""
    text = _split_text(labelled) + "\n--\n" + _split_text(unlabelled)
    return hashlib.sha256(text.encode()).hexdigest()


def read_split_dir(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) ids from a folder written by write_split_dir or dataset/make_splits.py. A
    run asks twice (its flags take the budget from it, its loaders the ids): the files are read once if
    unchanged."""
    path = Path(path)
    stamps = []
    for name in SPLIT_FILES:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(
                f"split file {file} does not exist: --split_dir must be a folder written "
                f"by dataset/make_splits.py (labelled.txt and unlabelled.txt)"
            )
        stamps.append(file_stamp(file))
    labelled, unlabelled = _read_split_files(path.resolve(), tuple(stamps))
    if not labelled:
        raise DataError(
            f"split file {path / 'labelled.txt'} lists no ids; re-create it with dataset/make_splits.py"
        )
    return list(labelled), list(unlabelled)


@functools.lru_cache(maxsize=8)
def _read_split_files(folder: Path, stamps: tuple) -> tuple[tuple[str, ...], ...]:
    """The ids of a split folder's files, kept while their stamps (inode, mtime, size: any rewrite) stay."""
    return tuple(
        tuple(
            line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()
        )
        for name in SPLIT_FILES
    )


def shipped_splits() -> list[str]:
    """Names of the shipped standard splits ('cityscapes/1_30', 'pascal/92', ...), grouped by dataset."""

    def order(name: str) -> tuple:  # per dataset: counts up, then fractions up, then other draws (u2pl_...)
        dataset, split = name.split("/")
        parts = split.split("_")
        numbers = [int(p) for p in parts if p.isdigit()]
        size = numbers[0] / max(numbers[1], 1) if len(numbers) == 2 else numbers[0] if numbers else 0
        return dataset, "_".join(p for p in parts if not p.isdigit()), len(numbers), size, split

    return sorted(
        (f"{p.parent.parent.name}/{p.parent.name}" for p in SHIPPED_SPLITS.glob("*/*/labelled.txt")),
        key=order,
    )


def shipped_split_dir(name: str, dataset: str) -> Path:
    """The folder of the shipped split `name` (--split) for `dataset`; UserError listing the shipped ones."""
    available = shipped_splits()
    if name not in available:
        raise UserError(
            f"--split {name} is not a shipped split: choose one of {', '.join(available)} "
            f"(dataset/splits/README.md), or pass a folder with --split_dir DIR"
        )
    family = name.split("/")[0]
    if family != dataset:
        raise UserError(
            f"--split {name} is a split of {family}, not of --dataset {dataset}: "
            f"pass --dataset {family} or another --split"
        )
    return SHIPPED_SPLITS / name


def load_split(data: DatasetFiles, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) ids of a split folder, each checked against the training list; original names of
    files that the preprocessing numbered (Cityscapes) are mapped to the numbers through its name record."""
    root = data.checked_root()
    labelled, unlabelled = read_split_dir(path)
    numbers = None if all(i.isdigit() for i in labelled + unlabelled) else data.renamed_ids()
    if numbers is not None:
        _refuse_unknown(
            path,
            labelled,
            unlabelled,
            numbers,
            f"images that {name_record_path(root, 'train')} does not list",
            "the split is not of this Cityscapes train set; pass another --split / --split_dir",
        )
        labelled, unlabelled = [numbers[i] for i in labelled], [numbers[i] for i in unlabelled]
    _refuse_unknown(
        path,
        labelled,
        unlabelled,
        set(data.list_ids("train")),
        f"ids that are not in the {data.info.name} training list of {root}",
        "the split is of another dataset or list; pass another --split / --split_dir, or another --data_root",
    )
    return labelled, unlabelled


def _refuse_unknown(
    path: str | os.PathLike,
    labelled: Sequence[str],
    unlabelled: Sequence[str],
    known: Collection[str],
    what: str,
    fix: str,
) -> None:
    """DataError naming the split file and its first id not in `known` (`what` they are, and the fix)."""
    for name, ids in (("labelled.txt", labelled), ("unlabelled.txt", unlabelled)):
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(
                f"split file {Path(path) / name} lists {len(unknown)} {what} (first: {unknown[0]}): {fix}"
            )

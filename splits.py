"""Label budgets: the reference's class-balanced samplers (pure functions of ids, class sets, budget and
seed) and split folders (labelled.txt / unlabelled.txt)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from build_data import FOLDER, DataError, DatasetInfo, data_root, label_path, list_ids, present_classes, read_label
from helpers import atomic_save

ClassSets = Mapping[str, Collection[int]] | Callable[[str], Collection[int]]


def _budget_error(num_labels: int, got: int, why: str) -> DataError:
    return DataError(f"cannot pick {num_labels} labelled images: {why} (picked {got}); pass a smaller "
                     f"--num_labels, or --num_labels 0 to use every training image")


def select_labelled(ids: Sequence[str], class_sets: ClassSets, num_labels: int, seed: int, num_classes: int,
                    min_classes: int, retire_missing: bool = False) -> tuple[list[str], list[str]]:
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
                    held = set().union(*(classes_of(i) for i in work + rejected if len(classes_of(i)) >= min_classes))
                if not held:
                    need = (f" including one of the least-seen classes {sorted(least_seen)}"
                            if labelled and not retire_missing else "")
                    raise _budget_error(num_labels, len(labelled),
                                        f"no remaining image has >= {min_classes} classes{need}")
                active &= held
                failed.clear()
        fewest = min(counter[c] for c in active)
        least_seen = {c for c in active if counter[c] == fewest}
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
            cache[i] = frozenset(present_classes(label).tolist())
        return cache[i]

    if info.min_classes == 0:
        return select_labelled_sun(ids, classes_of, num_labels, seed, info.num_classes)
    return select_labelled(ids, classes_of, num_labels, seed, info.num_classes, info.min_classes,
                           retire_missing=info.layout == FOLDER)


def write_split_dir(path: str | os.PathLike, labelled: Sequence[str], unlabelled: Sequence[str]) -> None:
    """Write path/labelled.txt and path/unlabelled.txt, one id per line."""
    for name, split_ids in (("labelled.txt", labelled), ("unlabelled.txt", unlabelled)):
        text = "".join(f"{i}\n" for i in split_ids)
        atomic_save(lambda tmp: tmp.write_text(text), Path(path) / name)


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


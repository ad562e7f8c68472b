"""Label-budget splits: exact agreement with a naive transcription of the reference's sampler loops."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import splits
from build_data import DataError
from layouts import resolve_dataset
from splits import select_labelled, select_labelled_sun

REPO = Path(__file__).resolve().parents[1]


def naive_pascal(ids, class_sets, num_labels, seed, num_classes, min_classes):
    """The reference's Pascal/Cityscapes loop word by word (global random, list.pop()); None where it would
    loop forever."""
    random.seed(seed)
    work = list(ids)
    random.shuffle(work)
    counter = [0] * num_classes
    fill = list(range(num_classes))
    labelled, rejected = [], []
    steps = 0
    while len(labelled) < num_labels:
        steps += 1
        if steps > 3 * (num_labels + 1) * len(ids):  # far beyond any run that can finish
            return None
        if len(work) == 0:
            work = list(rejected)
            rejected = []
        idx = work.pop()
        classes = class_sets[idx]
        u = len(classes)
        if u >= min_classes and (len(labelled) == 0 or any(c in fill for c in classes)):
            labelled.append(idx)
            for c in classes:
                counter[c] += 1
        else:
            rejected.append(idx)
        fill = [c for c in range(num_classes) if counter[c] == min(counter)]
    return labelled, [i for i in ids if i not in labelled]


def naive_sun(ids, class_sets, num_labels, seed, num_classes):
    """The reference's SUN loop word by word; None where it would crash (empty fill / undefined id)."""
    random.seed(seed)
    work = list(ids)
    random.shuffle(work)
    class_list = [[i for i in work if c in class_sets[i]] for c in range(num_classes)]
    counter = [0] * num_classes
    fill = list(range(num_classes))
    ignored = []
    active_mask = [True] * num_classes
    labelled = []
    idx = None
    while len(labelled) < num_labels:
        if not fill:
            return None
        if len(class_list[fill[0]]) > 0:
            idx = class_list[fill[0]].pop()
        else:
            ignored.append(fill[0])
            active_mask[fill[0]] = False
        if idx is not None and idx not in labelled:
            labelled.append(idx)
            for c in class_sets[idx]:
                counter[c] += 1
            low = min(counter[c] for c in range(num_classes) if active_mask[c])
            fill = [c for c in range(num_classes) if counter[c] == low]
        fill = [c for c in fill if c not in ignored]
    return labelled, [i for i in ids if i not in labelled]


def random_class_sets(rng, ids, num_classes, max_size, concentration=1.0):
    sets = {}
    weights = rng.dirichlet(np.full(num_classes, concentration))  # some classes rare, some common
    for i in ids:
        size = rng.integers(1, max_size + 1)
        sets[i] = set(rng.choice(num_classes, size=size, replace=False, p=weights).tolist())
    return sets


def test_pascal_loop_matches_naive_transcription():
    rng = np.random.default_rng(0)
    compared = impossible = 0
    for trial in range(150):
        num_classes = int(rng.integers(3, 8))
        ids = [f"{2007 + trial % 5}_{k:06d}" for k in range(int(rng.integers(5, 40)))]
        sets = random_class_sets(rng, ids, num_classes, min(num_classes, 5))
        num_labels = int(rng.integers(1, len(ids) + 1))
        min_classes = int(rng.integers(1, 4))
        seed = int(rng.integers(0, 1000))
        expected = naive_pascal(ids, sets, num_labels, seed, num_classes, min_classes)
        if expected is None:
            impossible += 1
            with pytest.raises(DataError, match="cannot pick"):
                select_labelled(ids, sets, num_labels, seed, num_classes, min_classes)
        else:
            compared += 1
            assert select_labelled(ids, sets, num_labels, seed, num_classes, min_classes) == expected
    assert compared > 50 and impossible > 10  # both branches exercised


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_labels", [60, 600])
def test_pascal_split_on_the_shipped_id_list(seed, num_labels):
    ids = (REPO / "dataset" / "pascal" / "train_aug.txt").read_text().split()
    assert len(ids) == 10582
    rng = np.random.default_rng(seed)
    sets = random_class_sets(rng, ids, 21, 4, concentration=5.0)
    for i in ids:  # VOC-like: background in nearly every image
        sets[i].add(0)
    lookups = []
    got = select_labelled(ids, lambda i: lookups.append(i) or sets[i], num_labels, seed, 21, 3)
    assert got == naive_pascal(ids, sets, num_labels, seed, 21, 3)
    assert len(got[0]) == num_labels and len(set(got[0])) == num_labels
    assert len(lookups) < len(ids)  # class sets are read lazily


def test_pascal_hand_worked_example():
    ids = ["a", "b", "c", "d", "e"]
    w = list(ids)
    random.Random(7).shuffle(w)
    # Popped in the order w[-1], w[-2], ...; with C = 3 and min_classes = 2:
    sets = {w[-1]: {0}, w[-2]: {0, 1}, w[-3]: {0, 1}, w[-4]: {1, 2}, w[-5]: {1}}
    # w[-1] rejected (1 class); w[-2] accepted (first: >= 2 classes) -> least seen {2}; w[-3] rejected (no 2);
    # w[-4] accepted -> counts [1, 2, 1], least seen {0, 2}; w[-5] rejected (1 class); the rejected list
    # [w[-1], w[-3], w[-5]] becomes the working list: w[-5] rejected again, w[-3] accepted (has 0).
    labelled, unlabelled = select_labelled(ids, sets, 3, 7, 3, 2)
    assert labelled == [w[-2], w[-4], w[-3]]
    assert unlabelled == [i for i in ids if i in (w[-1], w[-5])]
    # A fourth needs class 2 (counts [2, 3, 1]); only w[-1] {0} and w[-5] {1} remain: impossible.
    with pytest.raises(DataError, match="cannot pick 4 labelled images"):
        select_labelled(ids, sets, 4, 7, 3, 2)


def test_first_accept_needs_only_min_classes():
    ids = ["x", "y"]
    w = list(ids)
    random.Random(0).shuffle(w)
    sets = {w[-1]: {0, 1}, w[-2]: {2, 3, 4}}
    assert select_labelled(ids, sets, 1, 0, 5, 2)[0] == [w[-1]]
    assert select_labelled(ids, sets, 1, 0, 5, 3)[0] == [w[-2]]


def test_impossible_budgets_fail_fast():
    ids = [str(k) for k in range(3000)]
    with pytest.raises(DataError, match="cannot pick 5 labelled"):
        select_labelled(ids, {i: {0, 1} for i in ids}, 5, 0, 21, 3)  # no image has 3 classes
    with pytest.raises(DataError, match="has 3000 images"):
        select_labelled(ids, {i: {0, 1, 2} for i in ids}, 3001, 0, 21, 3)
    with pytest.raises(DataError, match="cannot pick"):
        select_labelled_sun(
            ids[:10], {i: {0} if i != "3" else set() for i in ids[:10]}, 10, 0, 4
        )  # "3": no class


def test_sun_loop_matches_naive_transcription():
    rng = np.random.default_rng(1)
    compared = impossible = 0
    for trial in range(150):
        num_classes = int(rng.integers(2, 8))
        ids = [str(5051 + k) for k in range(int(rng.integers(3, 40)))]
        sets = random_class_sets(rng, ids, num_classes, min(num_classes, 4))
        num_labels = int(rng.integers(1, len(ids) + 1))
        seed = int(rng.integers(0, 1000))
        expected = naive_sun(ids, sets, num_labels, seed, num_classes)
        if expected is None:  # the reference crashes: we either meet the budget or say why not
            impossible += 1
            try:
                labelled, unlabelled = select_labelled_sun(ids, sets, num_labels, seed, num_classes)
            except DataError as error:
                assert "cannot pick" in str(error)
                assert num_labels > sum(
                    1 for i in ids if sets[i]
                )  # only when images without classes are needed
            else:
                assert len(set(labelled)) == num_labels and sorted(labelled + unlabelled) == sorted(ids)
        else:
            compared += 1
            assert select_labelled_sun(ids, sets, num_labels, seed, num_classes) == expected
    assert compared > 50 and impossible > 5


def test_sun_hand_worked_example():
    ids = ["1", "2", "3", "4"]
    w = list(ids)
    random.Random(3).shuffle(w)
    # class lists in shuffled order: 0 -> [w0, w2], 1 -> [w1], 2 -> [] (never present)
    sets = {w[0]: {0}, w[1]: {1}, w[2]: {0, 1}, w[3]: set()}
    # fill [0, 1, 2]: pop w2 (class 0 list) -> counts [1, 1, 0], fill [2]; class 2 empty -> ignored, fill []
    # (the reference crashes); we recompute it over the active classes: [0, 1] -> pop w0.
    assert select_labelled_sun(ids, sets, 2, 3, 3)[0] == [w[2], w[0]]
    # w3 has no class, so no loop can pick all four.
    with pytest.raises(DataError, match="cannot pick 4"):
        select_labelled_sun(ids, sets, 4, 3, 3)
    # Without class 2: fill [0, 1] -> w2; counts [1, 1] -> fill [0, 1] -> pop w0 -> counts [2, 1] -> fill [1]
    # -> class 1 list [w1] -> w1.
    labelled, unlabelled = select_labelled_sun(ids, sets, 3, 3, 2)
    assert labelled == [w[2], w[0], w[1]]
    assert unlabelled == [w[3]]


def test_split_dir_round_trip(tmp_path):
    splits.write_split_dir(tmp_path / "s", ["b", "a"], ["c", "d"])
    assert (tmp_path / "s" / "labelled.txt").read_text() == "b\na\n"
    assert splits.read_split_dir(tmp_path / "s") == (["b", "a"], ["c", "d"])
    with pytest.raises(FileNotFoundError, match="make_splits"):
        splits.read_split_dir(tmp_path / "missing")


def demo_class_sets(root):
    sets = {}
    for i in (root / "train_aug.txt").read_text().split():
        values = np.unique(np.array(Image.open(root / "SegmentationClassAug" / f"{i}.png")))
        sets[i] = set(values[values != 255].tolist())
    return sets


def test_get_split_on_demo(demo_root):
    data = resolve_dataset("demo", demo_root)
    ids = (demo_root / "train_aug.txt").read_text().split()
    sets = demo_class_sets(demo_root)
    for seed in (0, 1):
        expected = naive_pascal(ids, sets, 20, seed, data.info.num_classes, data.info.min_classes)
        assert splits.get_split(data, 20, seed) == expected
    assert splits.get_split(data, 0, 0) == (ids, ids)


def test_make_splits_script(demo_root, tmp_path, run_script):
    out = tmp_path / "split"
    args = ["--dataset", "demo", "--root", demo_root, "--num_labels", 12, "--seed", 2, "--out", out]
    code, stdout, err = run_script("make_splits.py", *args)
    assert code == 0, err
    assert stdout.startswith("12 labelled and 228 unlabelled ids written to")
    assert splits.read_split_dir(out) == splits.get_split(resolve_dataset("demo", demo_root), 12, 2)
    code, _, err = run_script("make_splits.py", *args[:4], "--num_labels", 100000, "--out", out)
    assert code == 2 and err.startswith("error: cannot pick 100000")


def test_get_split_cityscapes_numeric_order_and_train_ids(tmp_path):
    rng = np.random.default_rng(3)
    label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    sets = {}
    for i in range(14):  # ids 10..13 sort before 2 as strings
        present = rng.choice(label_ids, size=int(rng.integers(10, 16)), replace=False)
        label = rng.choice(np.concatenate([present, [0, 4]]), size=(8, 8)).astype(np.uint8)
        label.ravel()[: present.size] = present  # every chosen id appears
        Image.fromarray(label).save(tmp_path / "labels" / "train" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "train" / f"{i}.png")
        sets[str(i)] = {label_ids.index(v) for v in present.tolist()}
    ids = [str(i) for i in range(14)]
    for seed in range(4):
        expected = naive_pascal(ids, sets, 3, seed, 19, 12)
        assert splits.get_split(resolve_dataset("cityscapes", tmp_path), 3, seed) == expected


def test_get_split_sun_uses_its_own_loop(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "SUNRGBD-train_images").mkdir()
    (tmp_path / "sunrgbd_train_test_labels").mkdir()
    sets = {}
    for k in [7, 12, 5051, 5060, 10335, 40]:
        raw = rng.integers(0, 38, size=(6, 6)).astype(np.uint8)  # 0 = void, v -> class v - 1
        Image.fromarray(raw).save(tmp_path / "sunrgbd_train_test_labels" / f"img-{k:06d}.png")
        (tmp_path / "SUNRGBD-train_images" / f"img-{k:06d}.jpg").write_bytes(b"")
        sets[str(k)] = {int(v) - 1 for v in np.unique(raw) if v > 0}
    ids, data = sorted(sets, key=int), resolve_dataset("sun", tmp_path)
    for seed in range(4):
        assert splits.get_split(data, 4, seed) == naive_sun(ids, sets, 4, seed, 37)

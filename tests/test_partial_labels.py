"""Partial labels: byte-exact agreement with a naive transcription of the reference's preprocessing."""

import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

import preparation

SETTINGS = ("p25", "p5", "p1", "p0")


def naive_partial(label, fraction, void_values, fill):
    """One map, drawing from numpy's global stream, with an explicit repeated 5x5 dilation."""
    out = np.full(label.shape, fill, np.uint8)
    for c in np.unique(label):
        if c in void_values:
            continue
        region = label == c
        rows, cols = np.nonzero(region)
        pick = np.random.choice(len(rows), 1, replace=False)
        mask = np.zeros(label.shape, bool)
        mask[rows[pick], cols[pick]] = True
        target = int(fraction * len(rows))
        while (mask & region).sum() < target:
            mask = binary_dilation(mask, structure=np.ones((5, 5), bool))
        out[mask & region] = c
    return out


def naive_files(labels, seed, void_values=(255,), fill=255):
    """{setting: [map per file]} for one seed: the p25/p5/p1 pass over all files, then the p0 pass."""
    np.random.seed(seed)
    out = {s: [] for s in SETTINGS}
    for label in labels:
        for setting, fraction in (("p25", 0.25), ("p5", 0.05), ("p1", 0.01)):
            out[setting].append(naive_partial(label, fraction, void_values, fill))
    for label in labels:
        out["p0"].append(naive_partial(label, 0.0, void_values, fill))
    return out


def random_label(rng, shape, num_classes, void=255):
    """Blobby, fragmented classes, some tiny ones, a void band: a hard case for the square growth."""
    h, w = shape
    coarse = rng.integers(0, num_classes, size=(h // 6 + 2, w // 6 + 2))
    label = np.kron(coarse, np.ones((6, 6), np.int64))[:h, :w].astype(np.uint8)
    speckle = rng.random(shape) < 0.02
    label[speckle] = rng.integers(0, num_classes, size=speckle.sum())
    label[rng.integers(h), :] = void
    label[0, 0] = num_classes  # a class with a single pixel in a corner
    return label


def make_pascal_tree(tmp_path, labels):
    folder = tmp_path / "SegmentationClassAug"
    folder.mkdir(parents=True)
    names = [f"2008_{k:06d}" for k in range(len(labels))]
    for name, label in zip(names, labels):
        Image.fromarray(label).save(folder / f"{name}.png")
    return folder, names


def read(path):
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return [random_label(rng, shape, 5) for shape in [(37, 53), (60, 41), (29, 29), (48, 70)]]


def test_matches_naive_reference_byte_for_byte(tmp_path, labels):
    folder, names = make_pascal_tree(tmp_path, labels)
    files = sorted(folder.glob("*.png"))
    preparation.write_partial_labels(files, tmp_path, "SegmentationClassAug_{partial}_{seed}", seeds=(0, 2))
    for seed in (0, 2):
        expected = naive_files(labels, seed)
        for setting in SETTINGS:
            for k, name in enumerate(names):
                got = read(tmp_path / f"SegmentationClassAug_{setting}_{seed}" / f"{name}.png")
                assert got.dtype == np.uint8
                assert got.tobytes() == expected[setting][k].tobytes(), (seed, setting, name)


def test_p0_has_one_pixel_per_class_and_fractions_are_met(labels):
    rng = np.random.RandomState(5)
    for label in labels:
        classes = set(np.unique(label).tolist()) - {255}
        p0 = preparation.partial_label(label, rng, 0.0)
        values, counts = np.unique(p0[p0 != 255], return_counts=True)
        assert set(values.tolist()) == classes and (counts == 1).all()
        for fraction in (0.25, 0.05, 0.01):
            part = preparation.partial_label(label, rng, fraction)
            assert ((part == 255) | (part == label)).all()  # only true labels, inside their class
            for c in classes:
                assert (part == c).sum() >= max(1, int(fraction * (label == c).sum()))


class FixedChoice:
    """Stands in for the RNG: always picks index `k` of the class pixel list."""

    def __init__(self, k):
        self.k = k

    def choice(self, n, size, replace):
        return np.array([self.k])


def test_hand_worked_square():
    label = np.full((10, 10), 3, np.uint8)
    # seed (0, 0), target 25: the 3x3 square (9 px) is too small, the 5x5 one (25 px) is enough.
    expected = np.full((10, 10), 255, np.uint8)
    expected[:5, :5] = 3
    assert (preparation.partial_label(label, FixedChoice(0), 0.25) == expected).all()
    # target int(0.01 * 100) = 1: the seed pixel alone.
    single = preparation.partial_label(label, FixedChoice(55), 0.01)
    assert (single != 255).sum() == 1 and single[5, 5] == 3
    # Fragmented class: the square grows past the gap; only class pixels are labelled.
    label[:, 4:6] = 7
    got = preparation.partial_label(label, FixedChoice(0), 0.25, void_values=(7,), fill=0)
    # class 3 has 80 px, target 20: k=2 gives rows 0-4 x cols 0-4 minus cols 4 = 20 px.
    assert ((got == 3) == np.pad(np.ones((5, 4), bool), ((0, 5), (0, 6)))).all()
    assert set(np.unique(got).tolist()) == {0, 3}


def test_stream_runs_on_across_files(tmp_path, labels):
    both = tmp_path / "both"
    alone = tmp_path / "alone"
    for root, subset in ((both, labels[:2]), (alone, labels[1:2])):
        folder, _ = make_pascal_tree(root, subset)
        preparation.write_partial_labels(sorted(folder.glob("*.png")), root, "P_{partial}_{seed}", seeds=(0,))
    second = read(both / "P_p25_0" / "2008_000001.png")
    first_alone = read(alone / "P_p25_0" / "2008_000000.png")
    assert second.shape == first_alone.shape and not (second == first_alone).all()


def test_cityscapes_space_fill_zero_and_void_ids(labels):
    void = (0, 1, 2, 3)
    for seed in (0, 1):
        np.random.seed(seed)
        expected = [naive_partial(label, f, void, 0) for label in labels for f in (0.25, 0.05)]
        rng = np.random.RandomState(seed)
        got = [preparation.partial_label(label, rng, f, void, 0) for label in labels for f in (0.25, 0.05)]
        for e, g in zip(expected, got):
            assert (e == g).all()
            assert not np.isin(g[g != 0], void).any()


def tree_digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_pascal_script_idempotent_and_input_untouched(tmp_path, labels, run_script):
    folder, names = make_pascal_tree(tmp_path, labels[:2])
    before = tree_digest(folder)
    args = ["--root", tmp_path, "--seeds", 1, "--workers", 1]
    code, _, err = run_script("pascal_preprocess.py", *args)
    assert code == 0, err
    first = tree_digest(tmp_path)
    assert run_script("pascal_preprocess.py", *args)[0] == 0
    assert tree_digest(tmp_path) == first  # same bytes, no leftovers
    assert tree_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["SegmentationClassAug"] + [f"SegmentationClassAug_{s}_1" for s in SETTINGS]
    )
    expected = naive_files(labels[:2], 1)
    assert (read(tmp_path / "SegmentationClassAug_p5_1" / f"{names[1]}.png") == expected["p5"][1]).all()
    code, _, err = run_script("pascal_preprocess.py", "--root", tmp_path / "nope")
    assert code == 2 and err.startswith("error: no label PNGs in")


def test_demo_partial_labels(demo_root):
    ids = (demo_root / "train_aug.txt").read_text().split()[:3]
    for seed in (0, 1, 2):
        for setting in SETTINGS:
            for i in ids:
                part = read(demo_root / f"SegmentationClassAug_{setting}_{seed}" / f"{i}.png")
                full = read(demo_root / "SegmentationClassAug" / f"{i}.png")
                assert ((part == 255) | (part == full)).all()

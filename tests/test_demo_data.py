"""The demo data: deterministic per seed, the labelled split covers fewer nuisance conditions than the
unlabelled pool (on the generator's own records), and both layouts hold the same images."""

import hashlib
import json

import numpy as np
from PIL import Image

import dataset_table
import preparation
import splits
from layouts import resolve_dataset


def digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def records(root):
    return json.loads((root / preparation.DEMO_CONDITIONS).read_text())


def small(root, layout="pascal", seed=0, **sizes):
    sizes = {"num_train": 18, "num_val": 4, "size": 48, "partial_seeds": (0,), **sizes}
    return preparation.make_demo_dataset(root, seed=seed, layout=layout, **sizes)


def test_the_generator_is_deterministic_per_seed(tmp_path):
    first, again, other = (small(tmp_path / name, seed=seed) for name, seed in (("a", 4), ("b", 4), ("c", 5)))
    assert digest(first) == digest(again)
    changed = {name for name, value in digest(other).items() if digest(first).get(name) != value}
    assert {f"JPEGImages/train_{i:05d}.jpg" for i in range(18)} <= changed


def test_the_labelled_split_covers_fewer_conditions_than_the_unlabelled_pool(demo_root):
    data = resolve_dataset("demo", demo_root)
    site_of = {i: record["site"] for i, record in records(demo_root).items()}
    every_site = {site.site for site in preparation.DEMO_SITES}
    val = (demo_root / "val.txt").read_text().split()
    assert {site_of[i] for i in val} == every_site  # validation covers every condition
    budget = data.info.num_labels  # what the training scripts use on the demo
    for seed in range(5):
        labelled, unlabelled = splits.get_split(data, budget, seed)
        covered = {site_of[i] for i in labelled}
        assert {site_of[i] for i in unlabelled} == every_site
        assert len(covered) <= budget < len(every_site)
    # The records describe the images: grey-cast images have (almost) equal channels.
    images = {i: np.asarray(Image.open(demo_root / "JPEGImages" / f"{i}.jpg"), np.float32) for i in val}
    casts = {i: records(demo_root)[i]["cast"] for i in val}
    spread = {i: np.abs(image - image.mean(-1, keepdims=True)).mean() for i, image in images.items()}
    grey = [spread[i] for i in val if casts[i] == "grey"]
    assert grey and max(grey) < 2 < min(spread[i] for i in val if casts[i] != "grey")


def test_both_layouts_hold_the_same_images_labels_and_records(tmp_path):
    pascal = small(tmp_path / "p")
    folder = small(tmp_path / "f", layout=dataset_table.FOLDER, num_unlabelled=3)
    for sub, id_list in (("train", "train_aug.txt"), ("val", "val.txt")):
        names = sorted(p.stem for p in (folder / "images" / sub).iterdir())
        assert names == (pascal / id_list).read_text().split()
        for name in names:
            assert (folder / "images" / sub / f"{name}.jpg").read_bytes() == (
                pascal / "JPEGImages" / f"{name}.jpg"
            ).read_bytes()
            assert (folder / "labels" / sub / f"{name}.png").read_bytes() == (
                pascal / "SegmentationClassAug" / f"{name}.png"
            ).read_bytes()
    in_folder = records(folder)
    assert {i: in_folder[i] for i in records(pascal)} == records(pascal)
    assert len(in_folder) == len(records(pascal)) + 3  # the unlabelled images have records too


def test_a_demo_folder_from_an_older_generator_is_written_again_with_its_own_settings(tmp_path):
    assert preparation.demo_to_generate(tmp_path / "none") == {}
    root = small(tmp_path / "demo", seed=3)
    assert preparation.demo_to_generate(root) is None  # current
    current = digest(root)
    (root / "DEMO_DATASET").write_text(
        "seed=3 num_train=18 num_val=4 size=48\n"
    )  # as the first release wrote it
    (root / "JPEGImages" / "train_00000.jpg").write_bytes(b"an older image")
    settings = preparation.demo_to_generate(root)
    assert settings == {"seed": 3, "num_train": 18, "num_val": 4, "size": 48}
    preparation.make_demo_dataset(root, partial_seeds=(0,), **settings)
    assert digest(root) == current
    (root / "DEMO_DATASET").unlink()  # a Pascal-like folder not made here is read as it is
    assert preparation.demo_to_generate(root) is None

"""Preprocessing scripts on tiny trees: layout, order, resizing, idempotence, input never modified."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import build_data
import preparation
from layouts import resolve_dataset

REPO = Path(__file__).resolve().parents[1]


def digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read(path):
    return np.array(Image.open(path))


# --- demo ---


def test_demo_dataset_content(demo_root):
    train = (demo_root / "train_aug.txt").read_text().split()
    val = (demo_root / "val.txt").read_text().split()
    assert len(train) == 240 and len(val) == 48 and not set(train) & set(val)
    multi = 0
    for i in train[:40] + val[:10]:
        image = Image.open(demo_root / "JPEGImages" / f"{i}.jpg")
        label = read(demo_root / "SegmentationClassAug" / f"{i}.png")
        assert image.mode == "RGB" and image.size == (96, 96) and label.shape == (96, 96)
        values = set(np.unique(label).tolist())
        assert values <= {*range(7), 255} and 255 in values  # void borders around objects
        multi += len(values - {255}) >= 2
    assert multi >= 45
    for seed in (0, 1, 2):
        for setting in ("p0", "p1", "p5", "p25"):
            assert len(list((demo_root / f"SegmentationClassAug_{setting}_{seed}").glob("*.png"))) == 288


def test_demo_script_is_deterministic(tmp_path, run_script):
    # A real `python dataset/X.py` run from the repo root, without PYTHONPATH.
    cmd = [
        sys.executable,
        "dataset/demo_preprocess.py",
        "--root",
        str(tmp_path / "a"),
        "--seed",
        "3",
        "--num_train",
        "5",
        "--num_val",
        "2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    preparation.make_demo_dataset(tmp_path / "b", seed=3, num_train=5, num_val=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    # Re-running replaces a demo dataset; a foreign non-empty folder is refused.
    assert (
        run_script(
            "demo_preprocess.py", "--root", tmp_path / "a", "--seed", 3, "--num_train", 5, "--num_val", 2
        )[0]
        == 0
    )
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(build_data.DataError, match="not a demo dataset"):
        preparation.make_demo_dataset(tmp_path / "mine", num_train=2, num_val=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# --- Cityscapes ---


def test_cityscapes_preprocess(tmp_path, run_script, cityscapes_source):
    src, root = tmp_path / "src", tmp_path / "out" / "cityscapes"
    made = cityscapes_source(src)
    before = digest(src)
    args = ["--src", src, "--root", root, "--seeds", 0, "--workers", 1]
    code, _, err = run_script("cityscapes_preprocess.py", *args)
    assert code == 0, err
    order = {
        "train": [("aachen", 3), ("aachen", 19), ("zurich", 3), ("zurich", 19)],
        "val": [("lindau", 3), ("lindau", 19)],
    }
    for split, keys in order.items():
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == [
            f"{i}.png" for i in range(len(keys))
        ]
        for i, key in enumerate(keys):
            colour, label = made[split][key]
            image = read(root / "images" / split / f"{i}.png")
            assert image.shape == (512, 1024, 3) and (image == colour).all()
            expected = np.array(Image.fromarray(label).resize((1024, 512), Image.NEAREST))
            assert (read(root / "labels" / split / f"{i}.png") == expected).all()
    # Partial labels: label-id space, fill 0, void ids never sampled, numeric file order on one stream.
    void = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
    rng = np.random.RandomState(0)
    full = [read(root / "labels" / "train" / f"{i}.png") for i in range(4)]
    expected = {s: [] for s in ("p25", "p5", "p1", "p0")}
    for label in full:
        for s, f in (("p25", 0.25), ("p5", 0.05), ("p1", 0.01)):
            expected[s].append(preparation.partial_label(label, rng, f, void, 0))
    for label in full:
        expected["p0"].append(preparation.partial_label(label, rng, 0.0, void, 0))
    for s, maps in expected.items():
        for i, e in enumerate(maps):
            got = read(root / "labels" / f"train_{s}_0" / f"{i}.png")
            assert (got == e).all()
            assert set(np.unique(got).tolist()) == {0, 7, 8, 11, 21, 26}
    # Re-run: same bytes, input untouched, no temporary folders left.
    first = digest(root)
    assert run_script("cityscapes_preprocess.py", *args)[0] == 0
    assert digest(root) == first and digest(src) == before
    assert sorted(p.name for p in root.iterdir()) == ["images", "labels"]


def test_cityscapes_missing_label_is_a_clear_error(tmp_path, run_script, cityscapes_source):
    src = tmp_path / "src"
    cityscapes_source(src)
    next((src / "gtFine_trainvaltest" / "gtFine" / "val" / "lindau").glob("*.png")).unlink()
    code, _, err = run_script(
        "cityscapes_preprocess.py", "--src", src, "--root", tmp_path / "out", "--seeds", "--workers", 1
    )
    assert code == 2 and err.startswith("error: label ") and "is missing" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- SUN RGB-D ---


def make_sun_src(src):
    rng = np.random.default_rng(1)
    for folder in ("SUNRGBD-train_images", "SUNRGBD-test_images", "sunrgbd_train_test_labels"):
        (src / folder).mkdir(parents=True)
    colours = {}
    for folder, ks in (("SUNRGBD-train_images", [1, 2, 3]), ("SUNRGBD-test_images", [1, 2, 3, 4])):
        for k in ks:
            colour = rng.integers(0, 256, size=3, dtype=np.uint8)
            Image.fromarray(np.broadcast_to(colour, (30, 40, 3)).copy()).save(
                src / folder / f"img-{k:06d}.jpg"
            )
            colours[(folder, k)] = colour
    for k in [1, 2, 3, 4, 5051, 5052, 5053]:
        label = rng.integers(0, 38, size=(30, 40)).astype(np.uint8)
        Image.fromarray(label).save(src / "sunrgbd_train_test_labels" / f"img-{k:06d}.png")
    (src / "test_idx.txt").write_text("2\n4\n")
    return colours


def test_sun_preprocess(tmp_path, run_script):
    src, root = tmp_path / "raw", tmp_path / "sun"
    make_sun_src(src)
    before = digest(src)
    code, _, err = run_script("sun_preprocess.py", "--src", src, "--root", root, "--workers", 1)
    assert code == 0, err
    names = lambda folder: sorted(p.name for p in (root / folder).iterdir())  # noqa: E731
    assert names("SUNRGBD-train_images") == [f"img-{k:06d}.jpg" for k in (1, 3, 5051, 5052, 5053)]
    assert names("SUNRGBD-test_images") == ["img-000002.jpg", "img-000004.jpg"]
    assert names("sunrgbd_train_test_labels") == [f"img-{k:06d}.png" for k in (1, 2, 3, 4, 5051, 5052, 5053)]
    src_image = Image.open(src / "SUNRGBD-train_images" / "img-000002.jpg").convert("RGB")
    out_image = Image.open(root / "SUNRGBD-train_images" / "img-005052.jpg")
    assert out_image.size == (512, 384) and out_image.format == "JPEG"
    assert np.abs(np.array(out_image, float).mean((0, 1)) - np.array(src_image, float).mean((0, 1))).max() < 4
    label = Image.open(src / "sunrgbd_train_test_labels" / "img-005052.png")
    assert (
        read(root / "sunrgbd_train_test_labels" / "img-005052.png")
        == np.array(label.resize((512, 384), Image.NEAREST))
    ).all()
    assert (root / "test_idx.txt").read_text() == "2\n4\n"
    # Training reads it: 5 train ids in numeric order, 2 test ids.
    assert resolve_dataset("sun", root).list_ids("train") == ["1", "3", "5051", "5052", "5053"]
    # Re-run: same result; the input is never touched.
    first = digest(root)
    assert run_script("sun_preprocess.py", "--src", src, "--root", root, "--workers", 1)[0] == 0
    assert digest(root) == first and digest(src) == before


def test_sun_refuses_in_place_and_preprocessed_input(tmp_path, run_script):
    src = tmp_path / "raw"
    make_sun_src(src)
    code, _, err = run_script("sun_preprocess.py", "--src", src, "--root", src, "--workers", 1)
    assert code == 2 and "never changes its input" in err
    assert run_script("sun_preprocess.py", "--src", src, "--root", tmp_path / "sun", "--workers", 1)[0] == 0
    code, _, err = run_script(
        "sun_preprocess.py", "--src", tmp_path / "sun", "--root", tmp_path / "sun2", "--workers", 1
    )
    assert code == 2 and "error: no label img-010101.png" in err

"""A dataset described by its folder (--dataset folder --data_root DIR): the card, the checks before training,
images of any mode, images without masks, the sampler with few classes, every script on 2 and 7 classes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import build_data
import dataset_table
import engine
import evaluate
import layouts
import network
import preparation
import visual
from build_data import DataError
from dataset_card import read_card
from helpers import run_cli
from layouts import resolve_dataset
from module_list import IGNORE_INDEX
from run_folder import dataset_tag, metric_columns
from splits import get_split, select_labelled

SIZES = [(37, 41), (45, 33), (40, 40), (33, 51)]  # (H, W): odd and mixed
MODES = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"), ("RGB", ".jpeg")]
# The card's training settings keep every run tiny (and show that dataset.json sets the defaults).
TINY_CARD = {
    "crop_size": 33,
    "batch_size": 2,
    "epochs": 1,
    "iters_per_epoch": 2,
    "resnet_depth": 18,
    "pretrained": "none",
}
RECO = ["--num_queries", "16", "--num_negatives", "32", "--output_dim", "16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads contend and run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_image(path: Path, mode: str, height: int, width: int, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
    elif mode == "P":
        Image.fromarray(rgb).quantize(16).save(path)
    else:
        Image.fromarray(rgb).convert(mode).save(path)


def write_label(path: Path, label: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label, "L")
    if palette:  # a palette PNG: the stored index is the class
        image = image.convert("P")
        image.putpalette([v for c in range(256) for v in ((37 * c) % 256, (91 * c) % 256, (17 * c) % 256)])
    image.save(path)


def make_folder(
    root: Path,
    num_classes: int,
    train: int = 6,
    val: int = 2,
    unlabelled: int = 0,
    colours: bool = False,
    card: dict | None = None,
    void: int = 255,
) -> Path:
    """A tiny folder dataset: images of mixed sizes and modes, palette and grayscale labels holding two or
    three classes and a void row, optional images without masks, classes.txt and dataset.json."""
    rng = np.random.default_rng(num_classes)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            height, width = SIZES[i % len(SIZES)]
            mode, suffix = MODES[i % len(MODES)]
            write_image(root / "images" / split / f"{split}_{i}{suffix}", mode, height, width, rng)
            label = np.full((height, width), i % num_classes, np.uint8)
            label[height // 3 :, width // 2 :] = (i + 1) % num_classes
            if i % 3 == 0:
                label[height // 2 :, : width // 3] = (i + 2) % num_classes
            label[0] = void
            write_label(root / "labels" / split / f"{split}_{i}.png", label, palette=i % 2 == 1)
    for i in range(unlabelled):
        write_image(root / "unlabelled" / f"extra_{i}.png", "RGB", 35, 39, rng)
    lines = [f"class {c}" + (f" {c * 30} {255 - c * 30} 7" if colours else "") for c in range(num_classes)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps(TINY_CARD if card is None else card))
    return root


def cli_error(capsys, main, argv) -> str:
    """The one error line of a command that must refuse its input (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def train_argv(root: Path, tmp_path: Path, *extra) -> list[str]:
    return [
        "--dataset",
        "folder",
        "--data_root",
        str(root),
        "--weights_dir",
        str(tmp_path / "w"),
        "--log_dir",
        str(tmp_path / "log"),
        *extra,
    ]


# --- the card ---


def test_card_names_colours_overrides_and_defaults(tmp_path):
    root = make_folder(
        tmp_path / "d",
        3,
        val=3,
        card={"void": 200, "scale_range": [0.8, 1.2], "eval_size": [50, 60], "hue_jitter": 0},
    )
    (root / "classes.txt").write_text("back ground 0 0 0\nroad sign 10 20 30\ncar 255 0 5\n\n")
    info = resolve_dataset("folder", root).info
    assert info.class_names == ("back ground", "road sign", "car") and info.num_classes == 3
    assert info.palette[:3].tolist() == [[0, 0, 0], [10, 20, 30], [255, 0, 5]]
    assert info.eval_size == (50, 60) and info.scale_range == (0.8, 1.2) and info.min_classes == 2
    assert info.hue_jitter == 0.0 and read_card(root).hue_jitter == 0.0  # colour tells these classes apart
    assert info.label_table[[0, 2, 200, 255]].tolist() == [
        0,
        2,
        dataset_table.VOID,
        254,
    ]  # 255 is not void here
    assert (info.crop_size, info.batch_size, info.resnet_depth) == (
        (321, 321),
        10,
        101,
    )  # the silent defaults
    (root / "dataset.json").unlink()
    info = resolve_dataset("folder", root).info
    assert info.eval_size == (45, 41)  # the largest val image (H, W) when dataset.json is silent
    assert info.hue_jitter is None  # the reference's, filled in by the training flags
    assert info.palette[:3].tolist() == [[0, 0, 0], [10, 20, 30], [255, 0, 5]]
    assert read_card(root).min_classes == 2 and read_card(root).void == 255
    (root / "classes.txt").write_text("grade 1\ngrade 2 5\nsky 0 0\n")  # fewer than three numbers: a name
    assert (
        read_card(root).class_names == ("grade 1", "grade 2 5", "sky 0 0") and read_card(root).colours is None
    )


def test_card_files_from_windows_editors_read_as_written(tmp_path):
    root = make_folder(tmp_path / "d", 3)
    (root / "classes.txt").write_bytes(
        "\ufeffback ground 0 0 0\r\nZelle ä 1 2 3\r\ncar 4 5 6\r\n\r\n\n".encode()
    )
    (root / "dataset.json").write_bytes("\ufeff".encode() + json.dumps({"crop_size": [40, 50]}).encode())
    card = read_card(root)
    assert card.class_names == ("back ground", "Zelle ä", "car") and card.colours[2] == (4, 5, 6)
    assert card.crop_size == (40, 50)


def test_two_classes_default_to_voc_colours_and_min_classes_two(tmp_path):
    info = resolve_dataset("folder", make_folder(tmp_path / "d", 2)).info
    assert info.palette[:2].tolist() == dataset_table.DATASETS["pascal"].palette[:2].tolist()
    assert info.min_classes == 2 and info.num_classes == 2


def test_the_card_and_the_image_headers_are_read_once_until_a_file_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", 3, train=4, val=3)  # no eval_size in dataset.json: the val headers
    cards, opened = [], []
    monkeypatch.setattr(layouts, "read_card", lambda folder: cards.append(folder) or read_card(folder))
    open_image = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a: opened.append(Path(path)) or open_image(path, *a))
    for _ in range(3):  # as a run: its options, its loaders and its end-of-run figure
        data = resolve_dataset("folder", root)
        data.list_ids("test")
    val = sorted((root / "images/val").iterdir())
    assert data.info.eval_size == (45, 41) and len(cards) == 1 and [opened.count(p) for p in val] == [1, 1, 1]
    # a rewritten card and a replaced image are read again, once
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    write_image(val[0], "RGB", 50, 60, np.random.default_rng(0))
    write_label(root / "labels/val" / f"{val[0].stem}.png", np.ones((50, 60), np.uint8), False)
    for _ in range(2):
        data = resolve_dataset("folder", root)
        data.list_ids("test")
    assert data.info.num_classes == 4 and data.info.eval_size == (50, 60) and len(cards) == 2
    assert [opened.count(p) for p in val] == [2, 1, 1]


# --- one line for every bad input, before any training ---


def _drop(path):
    path.unlink()


BAD_DATA = {
    "image without label": (lambda r: _drop(r / "labels/train/train_2.png"), "train_2.png has no label"),
    "label without image": (lambda r: _drop(r / "images/val/val_1.png"), "val_1.png has no image"),
    "label size": (
        lambda r: write_label(r / "labels/train/train_1.png", np.zeros((5, 6), np.uint8), False),
        "is 6x5 but its image train_1.png is 33x45",
    ),
    "label values": (
        lambda r: write_label(r / "labels/train/train_3.png", np.full((33, 51), 9, np.uint8), True),
        "holds values [9] that are neither a class",
    ),
    "empty folder": (
        lambda r: [_drop(p) for p in (r / "images/val").iterdir()],
        "images/val holds no image files",
    ),
    "no folder": (lambda r: (r / "labels/val").rename(r / "labels/validation"), "labels/val not found"),
    "colour label": (
        lambda r: Image.new("RGB", (41, 37), (200, 0, 0)).save(r / "labels/train/train_0.png"),
        "is an RGB image of colours",
    ),
    "jpeg label": (
        lambda r: Image.open(r / "labels/train/train_0.png").convert("L").save(r / "labels/train/x.jpg"),
        "x.jpg is not a .png file",
    ),
    "tiff label": (
        lambda r: (r / "labels/val/val_0.png").rename(r / "labels/val/val_0.tif"),
        "val_0.tif is not a .png file: save it as val_0.png",
    ),
    "subfolder": (
        lambda r: (
            (r / "images/train/batch 2").mkdir()
            or (r / "images/train/train_0.jpg").rename(r / "images/train/batch 2/train_0.jpg")
        ),
        "images/train/batch 2 is a subfolder",
    ),
    "0/255 binary mask": (
        lambda r: [
            write_label(p, np.where(np.asarray(Image.open(p)) > 0, 255, 0).astype(np.uint8), False)
            for p in (r / "labels/train").iterdir()
        ],
        "hold only class 0 ('class 0') and void 255: there is nothing to tell apart",
    ),
    "masks of more classes": (
        lambda r: (r / "classes.txt").write_text("a\nb\n"),
        "name every class of your masks in classes.txt",
    ),
    "utf-16 classes.txt": (
        lambda r: (r / "classes.txt").write_text("a\nb\nc\n", encoding="utf-16"),
        "classes.txt is not UTF-8 text: save it as UTF-8",
    ),
    "duplicate stem": (
        lambda r: (r / "images/train/train_0.png").write_bytes((r / "images/train/train_1.png").read_bytes()),
        "share the stem 'train_0'",
    ),
    "corrupt image": (
        lambda r: (r / "images/train/train_1.png").write_bytes(b"not a png"),
        "cannot read image",
    ),
    "duplicate class": (lambda r: (r / "classes.txt").write_text("a\nb\na\n"), "'a' is on lines 1 and 3"),
    "empty class line": (lambda r: (r / "classes.txt").write_text("a\n\nc\n"), "line 2 is empty"),
    "colour without name": (
        lambda r: (r / "classes.txt").write_text("a 1 2 3\n4 5 6\n"),
        "has a colour but no class name",
    ),
    "bad colour": (lambda r: (r / "classes.txt").write_text("a 1 2 3\nb 1 2 300\n"), "is out of range"),
    "some colours": (lambda r: (r / "classes.txt").write_text("a 1 2 3\nb\n"), "on every line or on none"),
    "one class": (lambda r: (r / "classes.txt").write_text("a\n"), "at least two"),
    "no classes.txt": (lambda r: _drop(r / "classes.txt"), "classes.txt not found"),
    "unknown key": (lambda r: (r / "dataset.json").write_text('{"crop": 3}'), "unknown key(s) crop"),
    "bad json": (lambda r: (r / "dataset.json").write_text('{"crop_size": '), "is not valid JSON"),
    "bad size": (lambda r: (r / "dataset.json").write_text('{"crop_size": [3, -1]}'), "'crop_size' must be"),
    "batch of one": (
        lambda r: (r / "dataset.json").write_text('{"batch_size": 1}'),
        "'batch_size' must be a whole number >= 2",
    ),
    "void zero": (lambda r: (r / "dataset.json").write_text('{"void": 0}'), "'void' 0 must lie in 3..255"),
    "hue out of range": (
        lambda r: (r / "dataset.json").write_text('{"hue_jitter": 0.75}'),
        "'hue_jitter' must be a hue rotation in turns from 0 (none) to 0.5, got 0.75",
    ),
    "label named after the image file": (
        lambda r: (r / "labels/train/train_1.png").rename(r / "labels/train/train_1.png.png"),
        "train_1.png.png has no image of the same stem in ",
    ),
    "label of another image": (
        lambda r: (r / "labels/train/train_1.png").rename(r / "labels/train/train_12.png"),
        "images/train: add the image or remove the label",
    ),  # train_1 is not its image
    "float image": (
        lambda r: (
            Image.fromarray(np.ones((37, 41), np.float32)).save(r / "images/train/train_0.tif")
            or (r / "images/train/train_0.jpg").unlink()
        ),
        "train_0.tif holds 32-bit floats",
    ),
    "image of another format": (
        lambda r: (r / "images/train/train_0.jpg").rename(r / "images/train/train_0.heic"),
        "train_0.heic is not a format read here",
    ),
    "turned photo": (
        lambda r: write_label(r / "labels/train/train_1.png", np.zeros((33, 45), np.uint8), False),
        "its sides are swapped",
    ),
    "label stem with a suffix": (
        lambda r: (r / "labels/train/train_1.png").rename(r / "labels/train/train_1_mask.png"),
        "its name starts with that of image train_1.png: rename it train_1.png",
    ),
    "val folder named otherwise": (
        lambda r: [(r / d / "val").rename(r / d / "validation") for d in ("images", "labels")],
        "images/val not found (its folder holds: train, validation)",
    ),
    "void is a class": (
        lambda r: (r / "dataset.json").write_text('{"void": 1}'),
        "'void' 1 must lie in 3..255",
    ),
    "min_classes": (
        lambda r: (r / "dataset.json").write_text('{"min_classes": 4}'),
        "more than the 3 classes",
    ),
    "eval_size too small": (
        lambda r: (r / "dataset.json").write_text('{"eval_size": 40}'),
        "larger than the eval_size 40x40",
    ),
    "no mask image broken": (lambda r: (r / "unlabelled").mkdir(), "unlabelled holds no image files"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_input_is_one_line_before_training(case, tmp_path, capsys):
    root = make_folder(tmp_path / "d", 3, train=4)
    spoil, expected = BAD_DATA[case]
    spoil(root)
    err = cli_error(
        capsys,
        lambda a: engine.train(engine.get_args_parser("semi").parse_args(a)),
        train_argv(root, tmp_path, "--num_labels", "2"),
    )
    assert expected in err
    assert not (tmp_path / "log").exists()  # refused before any training output


def test_an_image_too_large_to_decode_is_named_with_the_fix(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "d", 3, train=4)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 300
    )  # PIL refuses twice this: our 33..51 px images are "huge"
    err = cli_error(
        capsys,
        lambda a: engine.train(engine.get_args_parser("sup").parse_args(a)),
        train_argv(root, tmp_path, "--num_labels", "2"),
    )
    assert "is too large to decode safely" in err and "cut it into tiles" in err


def test_folder_without_data_root_says_so(capsys):
    with pytest.raises(DataError, match="--dataset folder needs --data_root DIR"):
        resolve_dataset("folder", None)
    err = cli_error(capsys, evaluate.main, ["--dataset", "folder", "--checkpoint", "x.pth"])
    assert "needs --data_root" in err


# --- reading: any image mode, file names as users write them, images without masks ---


def test_file_names_as_users_write_them(tmp_path, run_script):
    root = make_folder(tmp_path / "d", 3, train=4)
    renames = {
        "train_0": "IMG 0001.JPG",
        "train_1": "scan.2024.01.05.png",
        "train_2": "Zelle ä 細胞.png",
        "train_3": "x.y.z.JPEG",
    }  # the labels of the last two are <stem>.PNG, as tools on Windows write them
    for k, (old, new) in enumerate(renames.items()):
        [image] = (root / "images/train").glob(f"{old}.*")
        image.rename(root / "images/train" / new)
        label = root / "labels/train" / f"{Path(new).stem}.{'PNG' if k > 1 else 'png'}"
        (root / "labels/train" / f"{old}.png").rename(label)
    (root / "images/train/__MACOSX").mkdir()  # what a zip made on a Mac unpacks: no images, only ._ files
    (root / "images/train/__MACOSX/._IMG 0001.JPG").write_bytes(b"\0\5\x16\7")
    (root / "images/val/._val_0.jpg").write_bytes(b"\0\5\x16\7")  # and ._ files beside the images
    data = resolve_dataset("folder", root)
    ids = data.list_ids("train")
    assert ids == sorted(renames.values())
    code, out, err = run_script("folder_preprocess.py", "--root", root, "--seeds", "0", "--workers", "1")
    assert code == 0, err
    for partial in (None, "p1"):
        dataset = build_data.SegmentationDataset(data, ids, "train", partial=partial, crop_size=(33, 33))
        for i, image_id in enumerate(ids):
            path = data.label_path(image_id, "train", partial, 0)
            assert path.is_file() and path.stem == Path(image_id).stem
            assert dataset[i][1].shape == (33, 33)


def test_a_class_no_training_label_holds_is_named(tmp_path, capsys):
    root = make_folder(tmp_path / "d", 7, train=2)  # the two labels hold classes 0, 1 and 2
    data = resolve_dataset("folder", root)
    data.list_ids("test")  # a val set may lack classes
    assert "warning" not in capsys.readouterr().err
    data.list_ids("train")
    err = capsys.readouterr().err
    assert err.startswith(
        f"warning: no label in {root / 'labels/train'} holds class 3 ('class 3'), 4 ('class 4'), "
        f"5 ('class 5'), 6 ('class 6') of classes.txt: the network cannot learn them"
    )


def test_folder_runs_are_named_by_their_folder_and_builtin_names_stay(tmp_path, monkeypatch):
    def name(dataset, root, *flags):
        argv = [
            "--dataset",
            dataset,
            "--num_labels",
            "2",
            *(["--data_root", str(root)] if root else []),
            *flags,
        ]
        return engine.resolve_args(engine.get_args_parser("semi").parse_args(argv)).name

    first, second = (
        make_folder(tmp_path / "a/cells", 2, train=2),
        make_folder(tmp_path / "b/cells", 2, train=2),
    )
    names = name("folder", first), name("folder", second)
    assert names[0] != names[1] and all(
        n.startswith("cells-") and n.endswith("_label2_semi_cutout_0") for n in names
    )
    monkeypatch.chdir(tmp_path / "b")
    assert name("folder", "cells") == names[1]  # the same folder, however it is written
    odd = make_folder(tmp_path / "my_data set.v2", 2, train=2)
    assert name("folder", odd, "--apply_reco").startswith("my-data-set.v2-")  # '_' keeps separating the parts
    assert name("demo", None, "--apply_aug", "classmix", "--apply_reco") == "demo_label2_semi_classmix_reco_0"
    assert (
        name("demo", tmp_path / "a/cells", "--seed", "3") == "demo_label2_semi_cutout_3"
    )  # --data_root: no change


def test_every_image_mode_reads_as_rgb_and_16_bit_is_scaled(tmp_path):
    root = make_folder(tmp_path / "d", 3, train=6)
    data = resolve_dataset("folder", root)
    info = data.info
    ids = data.list_ids("train")
    assert ids == sorted(p.name for p in (root / "images/train").iterdir())
    for i in ids:
        image = build_data.read_image(info, data.image_path(i, "train"))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    wide = build_data.read_image(info, root / "images/train/train_4.png")  # I;16: v * 257 -> v
    raw = np.asarray(Image.open(root / "images/train/train_4.png"))
    assert raw.dtype == np.uint16 and np.array_equal(wide[..., 1], raw // 257) and wide.max() > 200
    # palette and grayscale labels read as their stored indices
    label = build_data.read_label(info, data.label_path("train_1.png", "train"))
    assert set(np.unique(label)) == {1, 2, dataset_table.VOID}


def test_grey_masks_saved_with_colour_or_alpha_channels_read_as_their_values(tmp_path):
    root = make_folder(tmp_path / "d", 3, train=4)
    data = resolve_dataset("folder", root)
    stored = {}
    for path, mode in zip(sorted((root / "labels/train").iterdir()), ("RGB", "RGBA", "LA", "L")):
        stored[path] = np.asarray(
            Image.open(path)
        )  # what a tool exporting the same mask in another mode keeps
        Image.fromarray(stored[path], "L").convert(mode).save(path)
    data.list_ids("train")
    for path, values in stored.items():
        np.testing.assert_array_equal(build_data.read_label_values(path, ""), values)
    binary = np.zeros((5, 7), np.uint8)
    binary[1:3, 2:6] = 255
    Image.fromarray(binary).convert("1").save(tmp_path / "one_bit.png")  # a 1-bit PNG: black 0, white 1
    np.testing.assert_array_equal(build_data.read_label_values(tmp_path / "one_bit.png", ""), binary // 255)


def test_images_without_masks_yield_all_ignore_and_join_the_semi_pool(tmp_path, capsys):
    root = make_folder(tmp_path / "d", 3, train=4, unlabelled=3)
    data = resolve_dataset("folder", root)
    extra = data.unlabelled_ids()
    assert extra == [f"unlabelled/extra_{i}.png" for i in range(3)]
    dataset = build_data.SegmentationDataset(data, extra, "train", crop_size=(33, 33))
    image, label = dataset[0]
    assert image.shape == (3, 33, 33) and bool((label == IGNORE_INDEX).all())
    assert resolve_dataset("demo", root).unlabelled_ids() == []  # folder datasets only
    argv = train_argv(root, tmp_path, "--num_labels", "2")
    args = engine.resolve_args(engine.get_args_parser("semi").parse_args(argv))
    d = engine.init_distributed(args)
    (labelled, unlabelled), _, _ = engine.build_loaders(args, data, d)
    assert len(labelled) == 2 and unlabelled[-3:] == extra and len(unlabelled) == 2 + 3
    args.train_mode = "sup"
    (_, unlabelled), _, _ = engine.build_loaders(args, data, d)
    assert not set(extra) & set(unlabelled)  # a supervised run has no unlabelled branch


def test_monitors_of_an_unlabelled_pool_without_masks_read_n_a_not_zero(tmp_path, capsys):
    root = make_folder(tmp_path / "d", 3, train=4, unlabelled=3)
    split = (
        tmp_path / "split"
    )  # every labelled image labelled: the unlabelled pool is the images without masks
    split.mkdir()
    (split / "labelled.txt").write_text("\n".join(resolve_dataset("folder", root).list_ids("train")))
    (split / "unlabelled.txt").write_text("")
    engine.main("semi", train_argv(root, tmp_path, "--split_dir", str(split), "--no_visual"))
    assert "| unlabelled_miou n/a | unlabelled_acc n/a ||" in capsys.readouterr().out
    row = np.load(tmp_path / "log" / f"{dataset_tag('folder', root)}_label4_semi_cutout_0.npy")[0]
    columns = list(metric_columns(True))
    assert np.isnan(row[columns.index("unlabelled_miou")]) and np.isnan(row[columns.index("unlabelled_acc")])
    assert row[columns.index("labelled_acc")] > 0


# --- the class-balanced sampler with the dataset's classes ---


@pytest.mark.parametrize("num_classes", [2, 7])
def test_sampler_balances_the_cards_classes_and_ends_with_a_message(num_classes, tmp_path):
    root = make_folder(tmp_path / "d", num_classes, train=8)
    data = resolve_dataset("folder", root)
    labelled, unlabelled = get_split(data, 8, seed=0)
    assert sorted(labelled) == data.list_ids("train") and unlabelled == []
    # with only one class an image cannot count towards min_classes 2: the budget cannot be met
    for i in range(0, 8, 2):
        write_label(root / f"labels/train/train_{i}.png", np.zeros(SIZES[i % 4], np.uint8), False)
    with pytest.raises(DataError, match="cannot pick 5 labelled images: no remaining image has >= 2 classes"):
        get_split(data, 5, seed=0)
    assert len(get_split(data, 4, seed=0)[0]) == 4


def test_rare_classes_retire_instead_of_ending_the_split():
    # class 6 occurs once, class 5 never: after those, the reference's rule would wait forever for them
    sets = {f"i{k}": {k % 3, 3 + k % 2} for k in range(12)} | {"rare": {0, 6}}
    ids = sorted(sets)
    with pytest.raises(DataError, match="least-seen classes"):
        select_labelled(ids, sets, 10, 0, num_classes=7, min_classes=2)
    labelled, rest = select_labelled(ids, sets, 10, 0, num_classes=7, min_classes=2, retire_missing=True)
    assert len(labelled) == 10 and "rare" in labelled and len(set(labelled)) == 10 and len(rest) == 3
    with pytest.raises(DataError, match="cannot pick 14"):
        select_labelled(ids, sets, 14, 0, num_classes=7, min_classes=2, retire_missing=True)
    # up to the first retirement, the picks are the reference's
    assert select_labelled(ids, sets, 3, 0, 7, 2, retire_missing=True) == select_labelled(
        ids, sets, 3, 0, 7, 2
    )


def test_resume_continues_the_folders_own_run_and_a_moved_folder_can_continue(tmp_path, capsys):
    first = make_folder(tmp_path / "a/cells", 2, train=2, val=1)

    def argv(root, *flags):
        return train_argv(root, tmp_path, "--num_labels", "2", "--no_visual", *flags)

    engine.main("sup", argv(first, "--resume", "auto"))
    moved = shutil.copytree(first, tmp_path / "b/cells")
    engine.main(
        "sup", argv(moved, "--resume", "auto")
    )  # another folder of that name: its own run, from the start
    assert capsys.readouterr().out.count("EPOCH    1 ") == 2
    # resume compares the flags, not --data_root: the old run's file continues on the moved data
    old = tmp_path / "log" / f"{dataset_tag('folder', first)}_label2_sup_0" / "last.pth"
    engine.main("sup", argv(moved, "--resume", str(old)))
    assert "resuming at epoch 2" in capsys.readouterr().out


# --- every script, evaluate.py and visual.py on 2 and 7 classes ---


def test_two_classes_semi_reco_then_evaluate_and_visual(tmp_path, capsys):
    root = make_folder(tmp_path / "d", 2, train=6, val=2, unlabelled=2)
    engine.main(
        "semi",
        train_argv(
            root,
            tmp_path,
            "--num_labels",
            "3",
            "--apply_aug",
            "classmix",
            "--apply_reco",
            "--no_visual",
            *RECO,
        ),
    )
    name = f"{dataset_tag('folder', root)}_label3_semi_classmix_reco_0"
    assert "EPOCH    1" in capsys.readouterr().out
    assert np.load(tmp_path / "log" / f"{name}.npy")[0, 2] > 0  # the ReCo loss worked with two classes
    weights = tmp_path / "w" / f"{name}.pth"
    model = network.build_model("deeplabv3p", 2, output_dim=16, resnet_depth=18)  # dataset.json: ResNet-18
    model.load_state_dict(torch.load(weights, weights_only=True))
    result = evaluate.main(
        [
            "--dataset",
            "folder",
            "--data_root",
            str(root),
            "--checkpoint",
            str(weights),
            "--json",
            str(tmp_path / "e.json"),
            "--device",
            "cpu",
        ]
    )
    report = capsys.readouterr().out
    assert "class 0" in report and "class 1" in report and len(result["iou_per_class"]) == 2
    assert len(json.loads((tmp_path / "e.json").read_text())["iou_per_class"]) == 2
    [figure] = visual.main(
        [
            "--dataset",
            "folder",
            "--data_root",
            str(root),
            "--checkpoints",
            str(weights),
            "--out",
            str(tmp_path / "v.png"),
        ]
    )
    assert figure.stat().st_size > 1000
    # a checkpoint of another class count is refused with one line
    (root / "classes.txt").write_text("a\nb\nc\n")
    err = cli_error(
        capsys, evaluate.main, ["--dataset", "folder", "--data_root", str(root), "--checkpoint", str(weights)]
    )
    assert "predicts 2 classes but the dataset has 3" in err and "classes.txt" in err


def test_seven_classes_sup_with_a_split_dir_and_amp(tmp_path, capsys, run_script, monkeypatch):
    root = make_folder(tmp_path / "d", 7, train=8, val=2, colours=True)
    code, out, err = run_script(
        "make_splits.py",
        "--dataset",
        "folder",
        "--root",
        root,
        "--num_labels",
        "4",
        "--out",
        tmp_path / "split",
    )
    assert code == 0, err
    cards = []
    monkeypatch.setattr(layouts, "read_card", lambda folder: cards.append(folder) or read_card(folder))
    headers = build_data._header_size.cache_info().misses
    engine.main(
        "sup",
        train_argv(
            root, tmp_path, "--split_dir", str(tmp_path / "split"), "--amp", "bf16", "--apply_reco", *RECO
        ),
    )
    # make_splits.py read the card and every header: the run (options, loaders, figure) reads none again
    assert cards == [] and build_data._header_size.cache_info().misses == headers
    run = tmp_path / f"log/{dataset_tag('folder', root)}_label4_sup_reco_0"
    assert (run / "split/labelled.txt").read_text() == (tmp_path / "split/labelled.txt").read_text()
    assert (run / "visual.png").stat().st_size > 1000  # the figure uses the card's colours
    assert np.isfinite(np.load(run.parent / f"{run.name}.npy")).all()


@pytest.mark.parametrize("mode, num_classes", [("sup_partial", 2), ("semi_partial", 7)])
def test_partial_scripts_after_folder_preprocess(mode, num_classes, tmp_path, capsys, run_script):
    root = make_folder(
        tmp_path / "d", num_classes, train=6, unlabelled=1, card=TINY_CARD | {"void": 250}, void=250
    )
    full = np.asarray(Image.open(root / "labels/train/train_0.png"))
    err = cli_error(capsys, lambda a: engine.main(mode, a), train_argv(root, tmp_path, "--partial", "p1"))
    assert f"partial labels come from `python dataset/folder_preprocess.py --root {root}`" in err
    code, out, err = run_script("folder_preprocess.py", "--root", root, "--seeds", "0", "--workers", "1")
    assert code == 0, err
    partial = np.asarray(Image.open(root / "labels/train_p0_0/train_0.png"))
    classes = np.unique(full[full != 250])
    assert np.array_equal(
        np.unique(partial), [*classes, 250]
    )  # one pixel per class, the rest the card's void
    assert (partial != 250).sum() == len(classes)
    engine.main(mode, train_argv(root, tmp_path, "--partial", "p0", "--apply_reco", "--no_visual", *RECO))
    assert "EPOCH    1" in capsys.readouterr().out


def test_demo_in_the_folder_layout_holds_the_demo_data(tmp_path, run_script):
    code, out, err = run_script(
        "demo_preprocess.py",
        "--layout",
        "folder",
        "--root",
        tmp_path / "f",
        "--num_train",
        "3",
        "--num_val",
        "2",
        "--num_unlabelled",
        "2",
        "--size",
        "24",
    )
    assert code == 0, err
    pascal = preparation.make_demo_dataset(
        tmp_path / "p", num_train=3, num_val=2, size=24, partial_seeds=(0,)
    )
    for sub, folder in (("train", "train"), ("val", "val")):
        for label in (tmp_path / "f/labels" / folder).iterdir():
            assert label.read_bytes() == (pascal / "SegmentationClassAug" / label.name).read_bytes()
    assert (tmp_path / "f/labels/train_p1_0/train_00000.png").read_bytes() == (
        pascal / "SegmentationClassAug_p1_0/train_00000.png"
    ).read_bytes()
    data = resolve_dataset("folder", tmp_path / "f")
    info, demo = data.info, dataset_table.DATASETS["demo"]
    assert info.class_names == demo.class_names and np.array_equal(info.palette[:7], demo.palette[:7])
    assert (info.crop_size, info.eval_size, info.epochs, info.resnet_depth) == ((65, 65), (97, 97), 12, 18)
    assert len(data.unlabelled_ids()) == 2

"""Shared fixtures."""

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_table
import helpers
import network
import preparation

REPO = Path(__file__).resolve().parents[1]
DEMO_CLASSES = dataset_table.DATASETS["demo"].num_classes
# A training run small enough for a test: the demo at 33 x 33 crops, 2 images a batch, and a ReCo head
# and sampler a few hundred times smaller than the defaults.
TINY_RUN = {"dataset": "demo", "batch_size": 2, "crop_size": (33, 33)}
TINY_RECO = {"output_dim": 16, "num_queries": 16, "num_negatives": 32}


def cli_args(**flags) -> list[str]:
    """Command-line arguments from keyword flags: True is a bare switch, a tuple gives several values."""
    argv = []
    for name, value in flags.items():
        argv.append(f"--{name}")
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return argv


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (default sizes, seed 0), generated once per test session; treat as read-only."""
    return preparation.make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


@functools.cache
def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"dataset_script_{Path(name).stem}", REPO / "dataset" / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_script(capsys):
    """run_script('make_splits.py', *args) -> (exit code, stdout, stderr): a dataset/ script's main through
    helpers.run_cli, in this process (no interpreter start-up per call)."""
    return lambda name, *args: run_entry(_load_script(name).main, args, capsys)


def run_entry(main, args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an entry point's main(argv) run by helpers.run_cli in this process."""
    capsys.readouterr()
    try:
        helpers.run_cli(main, [str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo dataset small enough for several training runs in one test: 40 train and 4 val images of 48 px,
    partial labels of seed 0; generated once per session, treat as read-only."""
    return preparation.make_demo_dataset(
        tmp_path_factory.mktemp("small") / "demo", num_train=40, num_val=4, size=48, partial_seeds=(0,)
    )


def write_pascal_layout(root: Path, labels) -> Path:
    """Pascal layout: JPEGImages/{id}.jpg, SegmentationClassAug/{id}.png, val.txt (labels uint8 [H,W])."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(len(labels))]
    for image_id, label in zip(ids, labels):
        photo = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
        Image.fromarray(photo).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def write_constant_checkpoint(path: Path, winner: int, backbone: str = "deeplabv3p") -> Path:
    """A ResNet-18 checkpoint with the demo's classes whose logits favour class `winner` at every pixel."""
    torch.manual_seed(0)
    model = network.build_model(backbone, DEMO_CLASSES, output_dim=8, resnet_depth=18)
    last = model.classifier[3] if backbone == "deeplabv3p" else model.classifier.conv2d_list[0]
    convs = [last] if backbone == "deeplabv3p" else list(model.classifier.conv2d_list)
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
        last.bias[winner] = 10.0
    torch.save(model.state_dict(), path)
    return path


def write_cityscapes_source(src: Path) -> dict:
    """Two train cities created out of sorted order, two images each; one val city. Solid-colour images."""
    rng = np.random.default_rng(0)
    made = {}
    for split, cities in (("train", ["zurich", "aachen"]), ("val", ["lindau"])):
        for city in cities:
            img_dir = src / "leftImg8bit_trainvaltest" / "leftImg8bit" / split / city
            lab_dir = src / "gtFine_trainvaltest" / "gtFine" / split / city
            img_dir.mkdir(parents=True)
            lab_dir.mkdir(parents=True)
            for frame in (19, 3):
                stem = f"{city}_000000_{frame:06d}"
                colour = rng.integers(0, 256, size=3, dtype=np.uint8)
                Image.fromarray(np.broadcast_to(colour, (32, 64, 3)).copy()).save(
                    img_dir / f"{stem}_leftImg8bit.png"
                )
                label = rng.choice([0, 1, 7, 8, 11, 21, 26], size=(32, 64)).astype(np.uint8)
                Image.fromarray(label).save(lab_dir / f"{stem}_gtFine_labelIds.png")
                made.setdefault(split, {})[(city, frame)] = (colour, label)
    return made


@pytest.fixture
def pascal_layout():
    """write_pascal_layout(root, labels) -> root: a tiny Pascal-layout val set with the given label arrays."""
    return write_pascal_layout


@pytest.fixture
def constant_checkpoint():
    """write_constant_checkpoint(path, winner, backbone='deeplabv3p') -> path."""
    return write_constant_checkpoint


@pytest.fixture
def cityscapes_source():
    """write_cityscapes_source(src) -> {split: {(city, frame): (colour, label)}}: a raw Cityscapes tree."""
    return write_cityscapes_source

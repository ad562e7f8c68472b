"""predict.py end to end: a tiny model saved as a checkpoint, odd sizes and mixed modes, corrupt files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import build_data
import dataset_table
import network
import predict
from conftest import run_entry
from transforms import normalise

NUM_CLASSES = dataset_table.DATASETS["demo"].num_classes
# name -> (PIL mode, height, width); 'a' and 'd' share a padded size (49 x 65), so they are predicted together
IMAGES = {
    "a.jpg": ("RGB", 40, 57),
    "b.png": ("L", 33, 33),
    "c.png": ("RGBA", 50, 41),
    "d.png": ("P", 45, 60),
    "e.png": ("I;16", 20, 33),
}


def spread_deeplab(seed: int = 0) -> torch.nn.Module:
    """A random ResNet-18 DeepLabv3+ whose class biases are spread, so its masks hold several classes."""
    torch.manual_seed(seed)
    model = network.build_model("deeplabv3p", NUM_CLASSES, output_dim=16, resnet_depth=18).eval()
    with torch.no_grad():
        model.classifier[3].weight.mul_(20)
    return model


def write_image(path, mode, height, width, rng):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 3 :, : width // 2] //= 4  # some structure, so the mask is not noise
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray((pixels[..., 0].astype(np.uint16) * 3))
    elif mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of valid images of every mode, plus garbage bytes, a truncated PNG and a text file."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, (mode, height, width) in IMAGES.items():
        write_image(folder / name, mode, height, width, rng)
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    whole = (folder / "b.png").read_bytes()
    write_image(folder / "trunc.png", "RGB", 64, 64, rng)
    (folder / "trunc.png").write_bytes((folder / "trunc.png").read_bytes()[: len(whole) // 2])
    (folder / "notes.txt").write_text("not an input")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(spread_deeplab().state_dict(), path)
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    """predict.main through helpers.run_cli: (exit code, stdout, stderr)."""
    return run_entry(predict.main, argv, capsys)


def expected_mask(model, path, flip=False, window=None) -> np.ndarray:
    """The model's own prediction: the image reflect-padded to 16k + 1 px, predict, argmax, cut back."""
    photo = build_data.read_image(dataset_table.DATASETS["demo"], path)
    height, width = photo.shape[:2]
    image = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255
    pad_h, pad_w = (-(height - 1)) % 16, (-(width - 1)) % 16
    image = normalise(F.pad(image, (0, pad_w, 0, pad_h), mode="reflect"))
    logits = network.predict(model, image, image.shape[-2:], flip=flip, window=window)
    return logits[0].argmax(0)[:height, :width].numpy()


def test_masks_are_the_models_prediction_and_unreadable_images_are_skipped(
    inputs, checkpoint, tmp_path, capsys
):
    out = tmp_path / "masks"
    code, stdout, err = run(
        [
            "--checkpoint",
            checkpoint,
            "--input",
            inputs,
            "--output",
            out,
            "--dataset",
            "demo",
            "--overlay",
            "--batch_size",
            2,
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: 2 of 7 images could not be read") and "bad.jpg" in lines[-1]
    assert "trunc.png" in lines[-1] and "notes.txt" not in err
    # each skipped file is reported once on its own line, with the reason, before the summary
    assert [line for line in lines if line.startswith(f"skipped {inputs / 'bad.jpg'}: ")] != []
    assert [line for line in lines if line.startswith(f"skipped {inputs / 'trunc.png'}: ")] != []
    assert "wrote 5 masks and overlays" in stdout
    model = spread_deeplab()
    palette = dataset_table.DATASETS["demo"].palette
    classes = set()
    for name, (_, height, width) in IMAGES.items():
        stem = name.split(".")[0]
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (width, height)
        assert np.array_equal(
            np.asarray(mask.getpalette(), np.uint8).reshape(-1, 3), palette[: len(mask.getpalette()) // 3]
        )
        np.testing.assert_array_equal(np.asarray(mask), expected_mask(model, inputs / name))
        classes |= set(np.unique(np.asarray(mask)).tolist())
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (width, height)
    assert len(classes) > 1  # the comparison means something
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n.split('.')[0]}{s}.png" for n in IMAGES for s in ("", "_overlay")
    )  # nothing half-written


def test_flip_and_window_go_through_network_predict(inputs, checkpoint, tmp_path, capsys):
    out = tmp_path / "masks"
    code, _, err = run(
        [
            "--checkpoint",
            checkpoint,
            "--input",
            str(inputs / "[e]*.png"),
            "--output",
            out,
            "--dataset",
            "demo",
            "--flip",
            "--window",
            17,
            33,
            "--num_workers",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    model = spread_deeplab()
    mask = np.asarray(Image.open(out / "e.png"))
    np.testing.assert_array_equal(mask, expected_mask(model, inputs / "e.png", flip=True, window=(17, 33)))
    assert not np.array_equal(mask, expected_mask(model, inputs / "e.png"))  # the flags changed something
    assert [p.name for p in out.iterdir()] == ["e.png"]  # the glob matched one file


def test_classes_come_from_the_run_folder_and_a_last_pth_gives_its_teacher(inputs, tmp_path, capsys):
    run_dir = tmp_path / "logging" / "demo_run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"args": {"dataset": "demo", "data_root": None}}))
    (tmp_path / "model_weights").mkdir()
    best = tmp_path / "model_weights" / "demo_run.pth"
    torch.save(spread_deeplab(1).state_dict(), best)
    torch.save(
        {"model": spread_deeplab(2).state_dict(), "teacher": spread_deeplab(3).state_dict(), "epoch": 1},
        run_dir / "last.pth",
    )
    for path, seed in ((best, 1), (run_dir / "last.pth", 3)):
        out = tmp_path / f"out_{path.stem}"
        code, stdout, err = run(["--checkpoint", path, "--input", inputs / "b.png", "--output", out], capsys)
        assert code == 0, err
        assert f"from {run_dir / 'config.json'}" in stdout
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "b.png")), expected_mask(spread_deeplab(seed), inputs / "b.png")
        )


def test_a_checkpoint_without_run_folder_needs_dataset_and_its_class_count(
    inputs, checkpoint, tmp_path, capsys
):
    out = tmp_path / "masks"
    code, _, err = run(["--checkpoint", checkpoint, "--input", inputs / "b.png", "--output", out], capsys)
    assert code == 2 and "pass --dataset NAME" in err and f"{NUM_CLASSES} classes" in err and "demo" in err
    code, _, err = run(
        ["--checkpoint", checkpoint, "--input", inputs / "b.png", "--output", out, "--dataset", "pascal"],
        capsys,
    )
    assert code == 2 and f"predicts {NUM_CLASSES} classes but the dataset has 21" in err
    assert not out.exists()


@pytest.mark.parametrize("output", ["", "sub", "sub/deeper"])
def test_an_output_folder_in_an_input_folder_is_refused(inputs, checkpoint, capsys, output):
    code, _, err = run(
        ["--checkpoint", checkpoint, "--input", inputs, "--output", inputs / output, "--dataset", "demo"],
        capsys,
    )
    assert code == 2 and "input folder" in err and err.count("\n") == 1
    assert not (inputs / "sub").exists() and not (inputs / "b_overlay.png").exists()


def test_two_inputs_writing_one_file_are_refused_before_any_work(inputs, checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "b.jpg", "RGB", 20, 20, np.random.default_rng(1))
    write_image(other / "a_overlay.jpg", "RGB", 20, 20, np.random.default_rng(1))
    out = tmp_path / "masks"
    for extra, clash in (
        ([inputs / "b.png", other / "b.jpg"], "b.png"),
        ([inputs / "a.jpg", other / "a_overlay.jpg", "--overlay"], "a_overlay.png"),
    ):
        code, _, err = run(
            ["--checkpoint", checkpoint, "--output", out, "--dataset", "demo", "--input", *extra], capsys
        )
        assert code == 2 and f"would both write {out / clash}" in err
    assert not out.exists()


def test_missing_inputs_empty_globs_and_a_file_as_output_are_named(inputs, checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, expected in (
        (tmp_path / "nope.jpg", "does not exist"),
        (empty, "holds no images"),
        (str(empty / "*.jpg"), "matches no image"),
    ):
        code, _, err = run(
            ["--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "o", "--dataset", "demo"],
            capsys,
        )
        assert (
            code == 2 and expected in err and str(empty if source != tmp_path / "nope.jpg" else source) in err
        )
    (tmp_path / "a_file").write_text("")
    code, _, err = run(
        [
            "--checkpoint",
            checkpoint,
            "--input",
            inputs / "b.png",
            "--output",
            tmp_path / "a_file",
            "--dataset",
            "demo",
        ],
        capsys,
    )
    assert code == 2 and f"--output {tmp_path / 'a_file'} is a file" in err


def test_padded_sizes_and_batches():
    assert predict.padded_size(33, 40) == (33, 49)
    assert predict.padded_size(1, 17) == (1, 17) and predict.padded_size(18, 16) == (33, 17)
    sizes = {0: (40, 57), 1: (33, 33), 2: (45, 60), 3: (49, 65), 4: (20, 20)}
    assert predict.size_batches(sizes, 2) == [[0, 2], [3], [1, 4]]  # 20 px pads to 33 too


@pytest.mark.skipif(
    not hasattr(dataset_table, "FOLDER"), reason="needs --dataset folder (the own-data branch)"
)
def test_a_folder_dataset_gives_its_classes_and_colours_through_the_run_folder(inputs, tmp_path, capsys):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "classes.txt").write_text("sky 10 20 30\nsea 200 100 0\n")  # the card alone, as on a machine that
    # only predicts: no images/, and no eval_size in a dataset.json
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"args": {"dataset": "folder", "data_root": str(data)}}))
    torch.manual_seed(0)
    model = network.build_model("deeplabv3p", 2, output_dim=16, resnet_depth=18).eval()
    with torch.no_grad():
        model.classifier[3].weight.mul_(20)
    torch.save({"model": model.state_dict()}, run_dir / "last.pth")
    out = tmp_path / "masks"
    code, _, err = run(
        ["--checkpoint", run_dir / "last.pth", "--input", inputs / "c.png", "--output", out], capsys
    )
    assert code == 0, err
    mask = Image.open(out / "c.png")
    assert mask.getpalette()[:6] == [10, 20, 30, 200, 100, 0]
    np.testing.assert_array_equal(np.asarray(mask), expected_mask(model, inputs / "c.png"))
    code, _, err = run(
        [
            "--checkpoint",
            run_dir / "last.pth",
            "--input",
            inputs / "c.png",
            "--output",
            out,
            "--dataset",
            "demo",
        ],
        capsys,
    )
    assert code == 2 and f"predicts 2 classes but the dataset has {NUM_CLASSES}" in err

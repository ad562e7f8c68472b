"""visual.py: blending, ignore handling, the saved figure and the missing-file messages."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_table
import figures
import helpers
import network
import visual
from layouts import resolve_dataset

REPO = Path(__file__).resolve().parents[1]


def test_blend_is_70_percent_colour_and_ignore_uses_row_255():
    palette = dataset_table.DATASETS["pascal"].palette
    photo = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    label = np.array([[0, 1, 15, -1, 255, 20, 2]] * 6)
    expected = 0.3 * photo + 0.7 * palette[np.where(label < 0, 255, label)].astype(float)
    np.testing.assert_allclose(figures.blend(photo, label, palette).astype(float), expected, atol=1)


def test_segment_copies_the_ignore_mask(tmp_path, constant_checkpoint):
    checkpoint = constant_checkpoint(tmp_path / "three.pth", 3)
    model = network_from(checkpoint)
    label = torch.full((40, 44), 1)
    label[:, :10] = -1
    prediction = figures.segment(model, torch.randn(3, 40, 44), label, torch.device("cpu"))
    assert prediction.shape == (40, 44)
    assert (prediction[:, :10] == -1).all() and (prediction[:, 10:] == 3).all()


def network_from(path):
    return network.load_model(path)


def test_draw_figure_writes_a_png_cropped_to_the_image(tmp_path, pascal_layout, constant_checkpoint):
    labels = [np.zeros((50, 70), np.uint8), np.full((33, 80), 4, np.uint8)]
    labels[1][:, :20] = 255
    root = pascal_layout(tmp_path / "data", labels)
    checkpoints = [constant_checkpoint(tmp_path / "a.pth", 1), constant_checkpoint(tmp_path / "b.pth", 4)]
    out = visual.draw_figure(
        "demo", checkpoints, titles=["A", "B"], index=1, data_root=root, out=tmp_path / "fig" / "v.png"
    )
    assert out == tmp_path / "fig" / "v.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    # the panels themselves: cropped back to 33x80, ground truth colours where labelled
    _, photo, image, label = figures.load_sample(resolve_dataset("demo", root), 1)
    assert photo.shape == (33, 80, 3) and label.shape == (97, 97)
    assert (label[:33, 20:80] == 4).all() and (label[:33, :20] == -1).all() and (label[33:] == -1).all()


def test_main_with_checkpoints_and_default_out_pattern(tmp_path, pascal_layout, constant_checkpoint):
    root = pascal_layout(tmp_path / "data", [np.ones((40, 40), np.uint8)])
    checkpoint = constant_checkpoint(tmp_path / "c.pth", 1)
    written = visual.main(
        [
            "--dataset",
            "demo",
            "--data_root",
            str(root),
            "--checkpoints",
            str(checkpoint),
            "--out",
            str(tmp_path / "visual_{dataset}.png"),
        ]
    )
    assert written == [tmp_path / "visual_demo.png"] and written[0].is_file()


def test_missing_published_checkpoint_names_file_and_download(tmp_path):
    """Run as a user would: exit code 2 and one line naming the file and its download link."""
    done = subprocess.run(
        [sys.executable, "visual.py", "--dataset", "pascal", "--weights_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pascal_label60_sup.pth" in done.stderr and "dropbox.com" in done.stderr
    assert done.stderr.count("\n") == 1


def test_missing_own_checkpoint_and_bad_index(tmp_path, capsys, pascal_layout, constant_checkpoint):
    root = pascal_layout(tmp_path / "data", [np.ones((40, 40), np.uint8)])
    checkpoint = constant_checkpoint(tmp_path / "c.pth", 1)
    cases = [
        (["--checkpoints", str(tmp_path / "nope.pth")], "nope.pth"),
        (["--checkpoints", str(checkpoint), "--index", "5"], "--index 5"),
        (["--checkpoints", str(checkpoint), "--titles", "x", "y"], "--titles"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as stop:
            helpers.run_cli(visual.main, ["--dataset", "demo", "--data_root", str(root), *extra])
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err


def test_reference_figure_defaults_pascal_entry_961_and_published_names(tmp_path, monkeypatch, pascal_layout):
    """No --checkpoints: the three published file names in --weights_dir, val entry 961, as the reference."""
    root = tmp_path / "pascal"
    ids = [f"id{i:04d}" for i in range(1000)]
    pascal_layout(root, [np.full((30, 40), 15, np.uint8)])  # writes img0; rename it to entry 961's id
    (root / "JPEGImages" / "img0.jpg").rename(root / "JPEGImages" / f"{ids[961]}.jpg")
    (root / "SegmentationClassAug" / "img0.png").rename(root / "SegmentationClassAug" / f"{ids[961]}.png")
    (root / "val.txt").write_text("\n".join(ids))
    weights = tmp_path / "weights"
    weights.mkdir()
    for kind in ("sup", "semi_classmix", "semi_classmix_reco"):
        model = network.build_model("deeplabv3p", 21, output_dim=8, resnet_depth=18)
        torch.save(model.state_dict(), weights / f"pascal_label60_{kind}.pth")
    monkeypatch.chdir(tmp_path)
    assert visual.main(["--dataset", "pascal", "--data_root", str(root), "--weights_dir", str(weights)]) == [
        Path("logging/visual_pascal.png")
    ]
    assert (tmp_path / "logging" / "visual_pascal.png").is_file()
    _, photo, _, label = figures.load_sample(resolve_dataset("pascal", root), 961)
    assert photo.shape == (30, 40, 3) and label.shape == (513, 513) and (label[:30, :40] == 15).all()

"""evaluate.py end to end on a tiny Pascal-layout dataset with checkpoints whose answer is known."""

import json
import math

import numpy as np
import pytest
import torch

import dataset_table
import evaluate
import helpers
import network


def test_prediction_equal_to_ground_truth_gives_miou_one(tmp_path, pascal_layout, constant_checkpoint):
    # every labelled pixel is class 2, the rest void: a model predicting 2 everywhere is perfect,
    # and the classes absent from both ground truth and prediction do not make the mean NaN
    labels = [
        np.where(np.arange(40 * 50).reshape(40, 50) % 7 == 0, 255, 2).astype(np.uint8),
        np.full((97, 60), 2, np.uint8),
    ]
    root = pascal_layout(tmp_path / "data", labels)
    checkpoint = constant_checkpoint(tmp_path / "two.pth", 2)
    out = tmp_path / "result.json"
    base = ["--dataset", "demo", "--data_root", str(root), "--checkpoint", str(checkpoint), "--device", "cpu"]
    result = evaluate.main(base + ["--json", str(out)])
    assert result["miou"] == 1.0 and result["acc"] == 1.0
    written = json.loads(out.read_text())
    assert written["miou"] == 1.0 and written["acc"] == 1.0
    assert written["iou_per_class"] == [None, None, 1.0] + [None] * (
        dataset_table.DATASETS["demo"].num_classes - 3
    )
    for extra in (["--flip"], ["--flip", "--window", "60", "33", "--batch_size", "1"]):
        assert evaluate.main(base + extra)["miou"] == 1.0


def test_hand_computed_confusion_matrix(tmp_path, capsys, pascal_layout, constant_checkpoint):
    rng = np.random.default_rng(3)
    labels = [
        rng.choice(np.array([0, 1, 3, 255], np.uint8), size=shape) for shape in ((30, 41), (97, 97), (64, 20))
    ]
    root = pascal_layout(tmp_path / "data", labels)
    checkpoint = constant_checkpoint(tmp_path / "one.pth", 1, backbone="deeplabv2")
    result = evaluate.main(
        ["--dataset", "demo", "--data_root", str(root), "--checkpoint", str(checkpoint), "--batch_size", "2"]
    )
    # prediction is class 1 everywhere: column 1 of the confusion matrix holds every valid pixel
    counts = {c: sum(int((label == c).sum()) for label in labels) for c in (0, 1, 3)}
    total = sum(counts.values())
    assert result["acc"] == pytest.approx(counts[1] / total)
    iou = result["iou_per_class"]
    assert iou[0] == 0.0 and iou[3] == 0.0 and iou[1] == pytest.approx(counts[1] / total)
    assert math.isnan(iou[2]) and math.isnan(iou[4])
    assert result["miou"] == pytest.approx(counts[1] / total / 3)
    report = capsys.readouterr().out
    assert dataset_table.DATASETS["demo"].class_names[1] in report and "mIoU" in report
    assert f"{100 * result['miou']:.2f}" in report


def test_user_errors_exit_2_with_the_file_named(tmp_path, capsys, pascal_layout, constant_checkpoint):
    root = pascal_layout(tmp_path / "data", [np.zeros((20, 20), np.uint8)])
    wrong_classes = tmp_path / "pascal21.pth"
    torch.save(
        network.build_model("deeplabv3p", 21, output_dim=8, resnet_depth=18).state_dict(), wrong_classes
    )
    constant_checkpoint(tmp_path / "ok.pth", 0)
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--checkpoint", str(wrong_classes)], "21 classes"),
        (["--checkpoint", str(tmp_path / "ok.pth"), "--resnet_depth", "50"], "--resnet_depth 50"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as stop:
            helpers.run_cli(evaluate.main, ["--dataset", "demo", "--data_root", str(root), *extra])
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err


def test_the_dataset_comes_from_the_checkpoints_run_folder(
    tmp_path, capsys, pascal_layout, constant_checkpoint
):
    root = pascal_layout(tmp_path / "data", [np.full((20, 30), 3, np.uint8)])
    run_dir = tmp_path / "logging" / "demo_label4_sup_0"
    run_dir.mkdir(parents=True)
    constant_checkpoint(tmp_path / "three.pth", 3)
    weights = torch.load(tmp_path / "three.pth", weights_only=True)
    torch.save({"model": weights, "epoch": 1}, run_dir / "last.pth")
    with pytest.raises(SystemExit) as stop:  # no config.json (a run from before it existed): pass --dataset
        helpers.run_cli(evaluate.main, ["--checkpoint", str(run_dir / "last.pth")])
    assert stop.value.code == 2 and "pass --dataset NAME [--data_root DIR]" in capsys.readouterr().err
    (run_dir / "config.json").write_text(json.dumps({"args": {"dataset": "demo", "data_root": str(root)}}))
    assert evaluate.main(["--checkpoint", str(run_dir / "last.pth")])["miou"] == 1.0
    assert f"--dataset demo --data_root {root} (from {run_dir / 'config.json'})" in capsys.readouterr().out


def test_groups_give_the_miou_of_each_condition_and_mark_what_the_labelled_images_show(
    tmp_path, capsys, pascal_layout, constant_checkpoint
):
    rng = np.random.default_rng(5)
    labels = [rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(24, 30)) for _ in range(3)]
    root = pascal_layout(tmp_path / "data", labels)  # ids img0, img1, img2
    conditions = {
        "img0": {"site": "a", "light": "dim"},
        "img1": {"site": "a", "light": "even"},
        "img2": {"site": "b", "light": "dim"},
        "train0": {"site": "a", "light": "bright"},  # the labelled image: shows site a, no test light
    }
    groups = tmp_path / "conditions.json"
    groups.write_text(json.dumps(conditions))
    run_dir = tmp_path / "logging" / "demo_label1_sup_0"
    (run_dir / "split").mkdir(parents=True)
    (run_dir / "split" / "labelled.txt").write_text("train0\n")
    (run_dir / "split" / "unlabelled.txt").write_text("train1\n")
    (run_dir / "config.json").write_text(json.dumps({"args": {"dataset": "demo", "data_root": str(root)}}))
    constant_checkpoint(run_dir / "last.pth", 1)  # class 1 at every pixel

    def miou(chosen):  # mIoU over the classes in ground truth or prediction, from numpy
        target = np.concatenate([labels[i].ravel() for i in chosen])
        target = target[target != 255]
        ious = [(target == 1).sum() / target.size if c == 1 else 0.0 for c in np.unique([*target, 1])]
        return np.mean(ious)

    out = tmp_path / "result.json"
    result = evaluate.main(
        [
            "--checkpoint",
            str(run_dir / "last.pth"),
            "--groups",
            str(groups),
            "--json",
            str(out),
            "--batch_size",
            "2",
        ]
    )
    site, light = result["groups"]["site"], result["groups"]["light"]
    assert list(site) == ["a", "b", "[shown]", "[not shown]"] and list(light) == [
        "dim",
        "even",
        "[not shown]",
    ]
    for rows, level, chosen, shown in (
        (site, "a", [0, 1], True),
        (site, "b", [2], False),
        (site, "[shown]", [0, 1], True),
        (site, "[not shown]", [2], False),
        (light, "dim", [0, 2], False),
        (light, "even", [1], False),
        (light, "[not shown]", [0, 1, 2], False),
    ):
        assert rows[level]["images"] == len(chosen) and rows[level]["shown"] is shown
        assert rows[level]["miou"] == pytest.approx(miou(chosen)), (level, chosen)
    assert json.loads(out.read_text())["groups"]["site"]["a"]["images"] == 2
    table = capsys.readouterr().out
    assert f"{run_dir / 'split'}/labelled.txt" in table
    assert "site    a*" in table and f"{100 * miou([2]):8.2f}" in table

    # no split beside a bare checkpoint: every level unmarked, no summary rows
    bare = constant_checkpoint(tmp_path / "bare.pth", 1)
    flags = [
        "--dataset",
        "demo",
        "--data_root",
        str(root),
        "--checkpoint",
        str(bare),
        "--groups",
        str(groups),
    ]
    site = evaluate.main(flags)["groups"]["site"]
    assert list(site) == ["a", "b"] and site["a"]["shown"] is None
    assert (
        list(evaluate.main(flags + ["--split_dir", str(run_dir / "split")])["groups"]["site"])[2] == "[shown]"
    )

    capsys.readouterr()
    del conditions["img2"]
    groups.write_text(json.dumps(conditions))
    for text, expected in (
        (None, "no conditions for 1 of the 3 test images (e.g. img2)"),
        ("[1, 2]", "expected"),
    ):
        if text:
            groups.write_text(text)
        with pytest.raises(SystemExit) as stop:
            helpers.run_cli(evaluate.main, flags)
        assert stop.value.code == 2
        out, err = capsys.readouterr()
        assert f"--groups {groups}" in err and expected in err
        assert "test images" not in out  # refused before the model is loaded and the images evaluated

    with pytest.raises(SystemExit) as stop:
        helpers.run_cli(evaluate.main, flags[:-2] + ["--split_dir", str(run_dir / "split")])
    assert stop.value.code == 2 and "--split_dir only marks" in capsys.readouterr().err

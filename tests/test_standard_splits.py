"""The shipped standard splits: --split NAME, the ids checked against the dataset, and Cityscapes' original
names mapped to the preprocessed numbering through the record dataset/cityscapes_preprocess.py writes."""

import subprocess
from pathlib import Path

import pytest
import torch

import build_data
import engine
import options
import splits
from distributed import Dist
from layouts import resolve_dataset

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    "cityscapes/1_30",
    "cityscapes/1_16",
    "cityscapes/1_8",
    "cityscapes/1_4",
    "cityscapes/1_2",
    "pascal/92",
    "pascal/183",
    "pascal/366",
    "pascal/732",
    "pascal/1464",
    "pascal/1_16",
    "pascal/1_8",
    "pascal/1_4",
    "pascal/u2pl_1_16",
    "pascal/u2pl_1_8",
    "pascal/u2pl_1_4",
]
SIZES = {
    "pascal/92": 92,
    "pascal/1464": 1464,
    "pascal/1_8": 1323,
    "cityscapes/1_30": 100,
    "cityscapes/1_2": 1488,
}


def resolve(mode, *argv):
    return options.resolve_args(options.get_args_parser(mode).parse_args([str(a) for a in argv]))


def test_shipped_splits_are_tracked_whole_and_licensed():
    assert splits.shipped_splits() == SHIPPED
    tracked = subprocess.run(
        ["git", "ls-files", "dataset/splits"], cwd=REPO, capture_output=True, text=True
    ).stdout
    tracked = set(tracked.split())
    assert {"dataset/splits/LICENSE-UniMatch", "dataset/splits/README.md"} <= tracked
    assert "Copyright (c) 2022 Lihe Yang" in (REPO / "dataset/splits/LICENSE-UniMatch").read_text()
    train_aug = set((REPO / "dataset/pascal/train_aug.txt").read_text().split())
    for name in SHIPPED:
        assert {f"dataset/splits/{name}/labelled.txt", f"dataset/splits/{name}/unlabelled.txt"} <= tracked
        labelled, unlabelled = splits.read_split_dir(splits.SHIPPED_SPLITS / name)
        assert len(labelled) == SIZES.get(name, len(labelled)) and not set(labelled) & set(unlabelled)
        if name.startswith("pascal"):
            assert set(labelled) | set(unlabelled) == train_aug
        else:
            assert len(labelled) + len(unlabelled) == 2975 and all("/" in i for i in labelled)


def test_split_flag_on_a_fake_pascal_root(tmp_path):
    root = tmp_path / "pascal"
    root.mkdir()
    ids = (REPO / "dataset/pascal/train_aug.txt").read_text().split()
    (root / "train_aug.txt").write_text("\n".join(ids) + "\n")
    args = resolve("semi", "--dataset", "pascal", "--data_root", root, "--split", "pascal/92")
    assert args.split_dir == str(REPO / "dataset/splits/pascal/92")
    assert (args.num_labels, args.name) == (92, "pascal_label92_semi_cutout_0")
    labelled, unlabelled = splits.load_split(resolve_dataset("pascal", root), args.split_dir)
    assert labelled == (REPO / "dataset/splits/pascal/92/labelled.txt").read_text().split()
    assert len(unlabelled) == len(ids) - 92
    # an id the dataset's training list lacks: one line naming the split file and the id
    (root / "train_aug.txt").write_text("\n".join(i for i in ids if i != labelled[5]) + "\n")
    with pytest.raises(
        build_data.DataError,
        match=f"pascal/92/labelled.txt lists 1 ids that are not in the "
        f"pascal training list of .*first: {labelled[5]}",
    ):
        splits.load_split(resolve_dataset("pascal", root), args.split_dir)


@pytest.mark.parametrize(
    "mode, argv, words",
    [
        (
            "semi",
            ["--dataset", "pascal", "--split", "pascal/93"],
            "--split pascal/93 is not a shipped split: choose one of cityscapes/1_30, ",
        ),
        (
            "semi",
            ["--dataset", "cityscapes", "--split", "pascal/92"],
            "--split pascal/92 is a split of pascal, not of --dataset cityscapes",
        ),
        (
            "sup",
            ["--dataset", "pascal", "--split", "pascal/92", "--split_dir", "x"],
            "both name a split: keep one",
        ),
        (
            "semi_partial",
            ["--dataset", "pascal", "--split", "pascal/92"],
            "partial-label runs use every image",
        ),
    ],
)
def test_split_flag_errors_are_one_line(mode, argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        engine.main(mode, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1, err
    if "not a shipped split" in words:
        assert all(name in err for name in SHIPPED)


def test_cityscapes_names_are_recorded_and_map_a_split(tmp_path, run_script, monkeypatch, cityscapes_source):
    src, root = tmp_path / "src", tmp_path / "cityscapes"
    cityscapes_source(src)
    code, _, err = run_script(
        "cityscapes_preprocess.py", "--src", src, "--root", root, "--seeds", "--workers", 1
    )
    assert code == 0, err
    train_names = [
        "aachen/aachen_000000_000003",
        "aachen/aachen_000000_000019",
        "zurich/zurich_000000_000003",
        "zurich/zurich_000000_000019",
    ]
    assert (root / "images/names_train.txt").read_text().split() == train_names  # line i names i.png
    assert (root / "images/names_val.txt").read_text().split() == [
        "lindau/lindau_000000_000003",
        "lindau/lindau_000000_000019",
    ]
    # a standard split naming original files, through --split and the engine's loaders
    shipped = tmp_path / "shipped"
    splits.write_split_dir(
        shipped / "cityscapes/tiny", [train_names[2], train_names[0]], [train_names[1], train_names[3]]
    )
    monkeypatch.setattr(splits, "SHIPPED_SPLITS", shipped)
    args = resolve(
        "semi",
        "--dataset",
        "cityscapes",
        "--data_root",
        root,
        "--split",
        "cityscapes/tiny",
        "--batch_size",
        2,
        "--num_workers",
        0,
    )
    data = resolve_dataset("cityscapes", root)
    (labelled, unlabelled), _, _ = engine.build_loaders(args, data, Dist(0, 1, torch.device("cpu")))
    assert (labelled, unlabelled) == (["2", "0"], ["1", "3"])
    # numbered ids pass as they are (a split written by a run or make_splits.py)
    splits.write_split_dir(tmp_path / "numbered", ["3"], ["0", "1", "2"])
    assert splits.load_split(data, tmp_path / "numbered") == (["3"], ["0", "1", "2"])
    # the real 1/30 split names images this tiny train set lacks
    with pytest.raises(
        build_data.DataError,
        match=r"1_30/labelled.txt lists 100 images that .*names_train.txt "
        r"does not list \(first: weimar/weimar_000085_000019\)",
    ):
        splits.load_split(data, REPO / "dataset/splits/cityscapes/1_30")


def test_cityscapes_copy_without_the_record_says_why(tmp_path, run_script, capsys, cityscapes_source):
    src, root = tmp_path / "src", tmp_path / "cityscapes"
    cityscapes_source(src)
    assert (
        run_script("cityscapes_preprocess.py", "--src", src, "--root", root, "--seeds", "--workers", 1)[0]
        == 0
    )
    (root / "images/names_train.txt").unlink()  # as the reference's download: numbered, no record
    with pytest.raises(SystemExit) as exit_info:
        engine.main(
            "semi", ["--dataset", "cityscapes", "--data_root", str(root), "--split", "cityscapes/1_30"]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    for words in (
        "names_train.txt not found",
        "does not record which original file each images/train/{i}.png is",
        "unsorted file-system order",
        "python dataset/cityscapes_preprocess.py",
    ):
        assert words in err, err

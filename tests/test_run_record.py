"""What a run tells its user: config.json at the start, summary.json and a printed summary at the end, a
visual.png over val images that cover the classes, and curves.png with a readable scale per loss; its
name, and reading a run back (run_folder.py) with and without config.json."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import engine
import figures
import options
import run_folder
import splits
from conftest import TINY_RUN, cli_args
from helpers import UserError
from layouts import resolve_dataset

TINY = cli_args(**TINY_RUN, iters_per_epoch=1, epochs=1, num_labels=4)
CONFIG_KEYS = {
    "args",
    "split_digest",
    "torch",
    "torchvision",
    "device",
    "world_size",
    "mode",
    "script",
    "threads",
    "deterministic",
}
SUMMARY_KEYS = {
    "best_miou",
    "best_epoch",
    "final_miou",
    "final_epoch",
    "epochs",
    "wall_s",
    "weights",
    "npy",
    "run_dir",
    "figures",
}


def test_a_run_records_its_config_and_ends_with_a_summary(small_demo, tmp_path, capsys):
    demo_root = small_demo
    argv = TINY + [
        "--data_root",
        str(demo_root),
        "--weights_dir",
        str(tmp_path / "w"),
        "--log_dir",
        str(tmp_path / "log"),
    ]
    engine.main("sup", argv)
    run_dir = tmp_path / "log" / "demo_label4_sup_0"
    config = json.loads((run_dir / "config.json").read_text())
    assert set(config) == CONFIG_KEYS
    expected = vars(options.resolve_args(options.get_args_parser("sup").parse_args(argv)))
    assert set(config["args"]) == set(expected)  # every resolved flag
    assert config["args"]["data_root"] == str(demo_root.resolve()) and config["args"]["crop_size"] == [33, 33]
    assert {
        k: config["args"][k]
        for k in (
            "dataset",
            "num_labels",
            "partial",
            "seed",
            "apply_aug",
            "apply_reco",
            "backbone",
            "resnet_depth",
            "output_dim",
            "name",
        )
    } == {
        "dataset": "demo",
        "num_labels": 4,
        "partial": None,
        "seed": 0,
        "apply_aug": "cutout",
        "apply_reco": False,
        "backbone": "deeplabv3p",
        "resnet_depth": 18,
        "output_dim": 256,
        "name": "demo_label4_sup_0",
    }
    split_text = (
        (run_dir / "split/labelled.txt").read_text()
        + "\n--\n"
        + (run_dir / "split/unlabelled.txt").read_text()
    )
    assert config["split_digest"] == hashlib.sha256(split_text.encode()).hexdigest()
    assert (config["torch"], config["torchvision"]) == (torch.__version__, torchvision.__version__)
    assert (config["device"], config["world_size"], config["mode"], config["script"]) == (
        "cpu",
        1,
        "sup",
        "train_sup.py",
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    npy = tmp_path / "log" / "demo_label4_sup_0.npy"
    miou = np.load(npy)[:, run_folder.metric_columns(False).index("test_miou")]
    assert (
        summary["best_miou"],
        summary["best_epoch"],
        summary["final_miou"],
        summary["final_epoch"],
        summary["epochs"],
    ) == (miou[0], 1, miou[0], 1, 1)
    assert summary["weights"] == str((tmp_path / "w" / "demo_label4_sup_0.pth").resolve())
    assert summary["npy"] == str((tmp_path / "log" / "demo_label4_sup_0.npy").resolve())
    assert summary["run_dir"] == str(run_dir.resolve()) and 0 < summary["wall_s"] < 600
    assert summary["figures"] == [str((run_dir / f).resolve()) for f in ("curves.png", "visual.png")]
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        rf"demo_label4_sup_0 finished in \d+m \d\ds: best val mIoU {miou[0]:.4f} \(epoch 1\), "
        rf"final {miou[0]:.4f} \(epoch 1 of 1\)",
        out[-6],
    ), out[-6]
    assert out[-5:] == [
        f"  weights  {summary['weights']}  (epoch 1)",
        f"  log      {summary['npy']}",
        f"  run      {summary['run_dir']}/  (config.json, curves.png, last.pth, metrics.csv, split/, "
        f"summary.json, tensorboard/, visual.png)",
        *[f"  figure   {f}" for f in summary["figures"]],
    ]
    # visual.png: one row per chosen val image (4), ground truth | prediction
    width, height = Image.open(run_dir / "visual.png").size
    assert height > 1.5 * width

    # read back from its config.json, then as a run made before config.json existed: from its .npy log's name
    (record,) = run_folder.find_runs([tmp_path])
    assert (record.source, record.semi, record.world_size) == (run_dir, False, 1)
    assert record.args == config["args"] and record.val_miou()[1] and list(record.val_miou()[0]) == [miou[0]]
    (run_dir / "config.json").unlink()
    (run_dir / "summary.json").unlink()
    (record,) = run_folder.find_runs([tmp_path])
    assert (record.source, record.semi, record.world_size) == (npy, False, None)
    assert record.args == {
        "dataset": "demo",
        "num_labels": 4,
        "partial": None,
        "apply_aug": None,
        "method": None,
        "apply_reco": False,
        "seed": 0,
    }
    assert list(record.val_miou()[0]) == [miou[0]] and run_folder.RunFiles(run_dir).finished()


def test_summary_points_at_the_saved_epoch():
    columns = run_folder.metric_columns(True)
    metrics = np.zeros((4, len(columns)))
    metrics[:, columns.index("test_miou")] = [0.2, 0.5, 0.5, 0.4]
    metrics[:, columns.index("labelled_miou")] = [0.9, 0.1, 0.1, 0.1]
    summary = run_folder.summarise(metrics, columns, 61.24, run_folder.RunFiles(Path("x"), Path("x.pth")), [])
    # the engine saves the weights on ties (>=): the last epoch reaching the best
    assert (summary["best_miou"], summary["best_epoch"]) == (0.5, 3)
    assert (summary["final_miou"], summary["final_epoch"], summary["epochs"], summary["wall_s"]) == (
        0.4,
        4,
        4,
        61.2,
    )


def test_covering_choice_is_greedy_and_deterministic():
    class_sets = [{0}, {0, 1}, {0, 1}, {2, 3}, {0, 4}, {0, 1, 2, 3}]
    assert figures.covering_choice(class_sets, 3) == [
        5,
        4,
        1,
    ]  # 4 new classes, then 1 new, then the most classes
    assert figures.covering_choice(class_sets, 2) == [5, 4]
    assert figures.covering_choice([{0}, {0}], 4) == [0, 1]
    assert figures.covering_choice([{0}, {1}, {0, 1}], 1) == [2]


def test_covering_test_images_read_the_val_labels(small_demo):
    ids = (small_demo / "val.txt").read_text().split()
    class_sets = [
        set(np.unique(np.array(Image.open(small_demo / "SegmentationClassAug" / f"{i}.png"))).tolist())
        - {255}
        for i in ids
    ]
    chosen = figures.covering_test_images(resolve_dataset("demo", small_demo), count=4)
    assert chosen == figures.covering_choice(class_sets, 4) and len(set(chosen)) == 4
    assert set().union(*(class_sets[i] for i in chosen)) == set().union(*class_sets)
    assert len(set().union(*class_sets)) >= 4  # the check would hold trivially on one class


def test_curves_give_each_loss_its_own_panel(tmp_path):
    semi = run_folder.metric_columns(True)
    assert figures.curve_panels(semi) == [
        ("sup_loss", ["sup_loss"]),
        ("unsup_loss", ["unsup_loss"]),
        ("reco_loss", ["reco_loss"]),
        ("test_loss", ["test_loss"]),
        ("miou", ["labelled_miou", "unlabelled_miou", "test_miou"]),
        ("acc", ["labelled_acc", "unlabelled_acc", "test_acc"]),
    ]
    assert [title for title, _ in figures.curve_panels(run_folder.metric_columns(False))] == [
        "train_loss",
        "test_loss",
        "miou",
        "acc",
    ]
    metrics = np.random.default_rng(0).uniform(0, 1, (3, len(semi)))
    metrics[:, semi.index("reco_loss")] += 5
    figures.plot_curves(metrics, semi, "run", tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (1500, 700)  # 2 rows of 3 panels


def test_each_mode_has_its_script_and_that_script_runs_the_mode():
    assert set(run_folder.MODE_SCRIPTS) == set(options.MODES)
    for mode, script in run_folder.MODE_SCRIPTS.items():  # the one table study.py and config.json use
        assert f'engine.main("{mode}")' in (Path(run_folder.__file__).parent / script).read_text()


@pytest.mark.parametrize(
    "mode, argv",
    [
        ("sup", ["--num_labels", "60"]),
        ("sup", ["--num_labels", "0", "--apply_reco", "--seed", "12"]),
        ("semi", ["--dataset", "pascal", "--apply_aug", "classmix", "--apply_reco", "--seed", "2"]),
        ("sup_partial", ["--partial", "p25"]),
        ("semi_partial", ["--apply_aug", "cutmix", "--partial", "p1"]),
        ("semi", ["--dataset", "folder", "--data_root", "my_data.v2/leaves_2024", "--apply_aug", "cutout"]),
        ("semi", ["--method", "unimatch", "--apply_reco"]),
        ("semi", ["--method", "fixmatch", "--seed", "3"]),
    ],
)
def test_a_run_name_reads_back_as_the_flags_it_was_made_of(mode, argv):
    args = options.get_args_parser(mode).parse_args(argv)
    # what resolve_args fills: the table's budget (15 on these datasets), none for partial labels
    args.num_labels = 0 if hasattr(args, "partial") else 15 if args.num_labels is None else args.num_labels
    args.partial = getattr(args, "partial", None)
    semi, online = options.MODES[mode].semi, args.method in ("fixmatch", "unimatch")
    name = run_folder.run_name(args, semi)
    flags, read_semi = run_folder.flags_of_name(name)
    assert read_semi == semi and flags == {
        "dataset": run_folder.dataset_tag(args.dataset, args.data_root),
        "num_labels": args.num_labels,
        "partial": args.partial,
        "apply_aug": args.apply_aug if semi and not online else None,
        "method": args.method if online else None,
        "apply_reco": args.apply_reco,
        "seed": args.seed,
    }
    assert run_folder.flags_of_name(name + "_x") is None and run_folder.flags_of_name("other") is None


def test_a_run_folder_reads_back_what_the_engine_wrote_and_refuses_an_unreadable_record(tmp_path):
    files = run_folder.RunFiles(tmp_path / "log" / "run")
    assert not files.finished() and run_folder.read_config(files.folder) is None
    files.folder.mkdir(parents=True)
    np.save(files.npy, np.array([[0.5, 0.25], [0.0, 0.0]]))  # one epoch of two written
    assert not files.finished() and run_folder.read_metrics(files.npy)[0].tolist() == [[0.5, 0.25]]
    files.summary.write_text("{}")
    assert files.finished()
    files.config.write_text('{"name": "another tool\'s"}')  # not a training run's: not a run
    assert run_folder.read_config(files.folder) is None and run_folder.find_runs([tmp_path]) == []
    files.config.write_text('{"args": ')
    with pytest.raises(UserError, match=r"run configuration .*config.json cannot be read"):
        run_folder.read_config(files.folder)


def test_a_split_folder_is_read_once_per_run_and_again_once_it_changes(small_demo, tmp_path, monkeypatch):
    ids = [f"train_{i:05d}" for i in range(6)]
    split = tmp_path / "split"
    splits.write_split_dir(split, ids[:2], ids[2:])
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(
        Path, "read_text", lambda path, *a, **k: reads.append(path.name) or read_text(path, *a, **k)
    )
    args = options.resolve_args(
        options.get_args_parser("sup").parse_args(
            ["--dataset", "demo", "--data_root", str(small_demo), "--split_dir", str(split)]
        )
    )  # the budget, the name
    assert args.num_labels == 2
    assert splits.load_split(resolve_dataset("demo", small_demo), args.split_dir) == (ids[:2], ids[2:])
    assert reads.count("labelled.txt") == reads.count("unlabelled.txt") == 1
    splits.write_split_dir(split, ids[:3], ids[3:])  # rewritten: read again
    assert splits.read_split_dir(split) == (ids[:3], ids[3:])


def test_a_semi_supervised_run_ends_with_its_gain_over_the_supervised_run_on_the_same_split(tmp_path):
    def run(name, mode, digest, best, data_root="data-a", lr=0.01, batch_size=4):
        folder = tmp_path / name
        folder.mkdir()
        config = {
            "args": {
                "dataset": "folder",
                "data_root": data_root,
                "split_dir": None,
                "lr": lr,
                "crop_size": [65, 65],
                "epochs": 12,
                "batch_size": batch_size,
            },
            "mode": mode,
            "split_digest": digest,
        }
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "summary.json").write_text(json.dumps({"best_miou": best}))
        return config

    semi = run("semi", "semi", "abc", 0.6)
    assert "not measured: `python train_sup.py`" in run_folder.baseline_line(semi, 0.6, tmp_path)
    run("other_split", "sup", "xyz", 0.1)
    run("other_data", "sup", "abc", 0.2, data_root="data-b")
    run("unfinished", "sup", "abc", 0.3)
    (tmp_path / "unfinished" / "summary.json").unlink()
    assert "not measured" in run_folder.baseline_line(semi, 0.6, tmp_path)
    run("twin", "sup", "abc", 0.45, batch_size=2)  # twice --batch_size: the semi run's 4 labelled crops
    line = run_folder.baseline_line(semi, 0.6, tmp_path)
    assert "+0.1500 best val mIoU" in line and "(0.4500" in line and str(tmp_path / "twin") in line
    assert "not matched" not in line and "crops" not in line
    run("twin_elsewise", "sup", "abc", 0.5, lr=0.03)  # newer: it is the twin, its lr and crops differ
    line = run_folder.baseline_line(semi, 0.6, tmp_path)
    assert line.endswith(
        "(0.5000, " + str(tmp_path / "twin_elsewise") + "/); not matched: --lr 0.03 there; "
        "labelled crops a step: 8 there, 4 here (--batch_size 2 there would match them)"
    )
    # the twin's config.json predates the flag: it trained at the reference's
    semi["args"]["hue_jitter"] = 0.0
    line = run_folder.baseline_line(semi, 0.6, tmp_path)
    assert "not matched: --lr 0.03 there, --hue_jitter 0.25 there;" in line
    semi["world_size"] = 2  # torchrun: 4 crops in each of 2 processes, as the twin's 8
    assert "crops" not in run_folder.baseline_line(semi, 0.6, tmp_path)
    semi["world_size"], semi["args"]["batch_size"] = 1, 3  # no supervised batch gives 3 crops
    assert run_folder.baseline_line(semi, 0.6, tmp_path).endswith("labelled crops a step: 8 there, 3 here")
    partial = run("semi_p", "semi_partial", "p", 0.5)
    assert "train_sup_partial.py" in run_folder.baseline_line(partial, 0.5, tmp_path)

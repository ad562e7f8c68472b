"""Flag handling (options), helpers and pieces of the training engine (no training here)."""

import argparse
import contextlib

import numpy as np
import pytest
import torch

import build_data
import distributed
import engine
import helpers
import methods
import network
import options
import run_folder
from layouts import resolve_dataset


def parse(mode, *argv):
    return options.get_args_parser(mode).parse_args(list(argv))


@pytest.mark.parametrize(
    "mode, dataset, has",
    [
        ("sup", "cityscapes", "num_labels"),
        ("semi", "cityscapes", "num_labels"),
        ("sup_partial", "cityscapes", "partial"),
        ("semi_partial", "pascal", "partial"),
    ],
)
def test_reference_defaults(mode, dataset, has):
    args = parse(mode)
    assert args.dataset == dataset
    resolved = options.resolve_args(parse(mode))  # the reference's optimiser values are resolved (--method)
    assert (resolved.lr, resolved.weight_decay, resolved.reco_weight) == (2.5e-3, 5e-4, 1.0)
    assert (args.seed, args.backbone, args.output_dim) == (0, "deeplabv3p", 256)
    assert (args.num_queries, args.num_negatives, args.temp) == (256, 512, 0.5)
    assert (args.weak_threshold, args.strong_threshold, args.apply_aug, args.apply_reco) == (
        0.7,
        0.97,
        "cutout",
        False,
    )
    assert getattr(resolved, has) == (15 if has == "num_labels" else "p0")
    # the unused reference flags are still accepted
    parse(mode, "--mode", "x", "--port", "1", "--gpu", "0", "--id", "3")


def test_the_demo_trains_every_method_on_its_own_label_budget_and_learning_rate():
    runs = [("sup",), ("semi",), ("semi", "--method", "fixmatch"), ("semi", "--method", "unimatch")]
    for mode, *method in runs:
        args = options.resolve_args(parse(mode, "--dataset", "demo", *method))
        assert (args.num_labels, args.lr) == (5, 0.01), method
    args = options.resolve_args(parse("semi", "--dataset", "demo", "--num_labels", "15", "--lr", "0.1"))
    assert (args.num_labels, args.lr, args.name) == (15, 0.1, "demo_label15_semi_cutout_0")
    assert options.resolve_args(parse("sup", "--dataset", "demo", "--num_labels", "0")).num_labels == 0


def test_hue_jitter_comes_from_the_table_and_reaches_the_loaders_and_the_step(demo_root):
    runs = [("sup", "demo", 0.0), ("semi", "demo", "--method", "unimatch", 0.0), ("semi", "pascal", 0.25)]
    for mode, dataset, *method, hue in runs:
        args = options.resolve_args(parse(mode, "--dataset", dataset, *method))
        assert args.hue_jitter == hue, (dataset, method)
        info = resolve_dataset(dataset).info
        settings = engine.step_settings(args, info, contextlib.nullcontext, args.method)
        assert settings.hue_jitter == hue
    argv = ("--dataset", "demo", "--data_root", str(demo_root), "--hue_jitter", "0.1", "--num_workers", "0")
    args = options.resolve_args(parse("semi", *argv))
    loaders = engine.build_loaders(
        args, resolve_dataset("demo", demo_root), distributed.Dist(0, 1, torch.device("cpu"))
    )[1]
    labelled = loaders[0].dataset  # the labelled crops' jitter (the unlabelled images': the step's)
    crops = [labelled[(0, seed)][0] for seed in range(4)]
    labelled.hue_jitter = 0.0
    assert any(not torch.equal(crop, labelled[(0, seed)][0]) for seed, crop in enumerate(crops))
    for bad in ("0.6", "-0.1"):
        with pytest.raises(helpers.UserError, match=f"--hue_jitter {bad}: a hue rotation in turns from 0"):
            options.resolve_args(parse("semi", "--dataset", "demo", "--hue_jitter", bad))


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("pascal", ((321, 321), 8, 0.001, 10.0, 80, 0.95, "ce", 1e-4)),
        ("cityscapes", ((801, 801), 8, 0.005, 1.0, 240, 0.0, "ohem", 1e-4)),
        ("sun", ((321, 321), 8, 0.001, 10.0, 80, 0.95, "ce", 1e-4)),
        ("demo", ((65, 65), 4, 0.01, 1.0, 12, 0.95, "ce", 1e-4)),
    ],
)
def test_fixmatch_and_unimatch_take_the_tables_defaults_and_flags_override_them(dataset, expected):
    flags = (
        "crop_size",
        "batch_size",
        "lr",
        "lr_multi",
        "epochs",
        "conf_thresh",
        "criterion",
        "weight_decay",
    )
    for method in ("fixmatch", "unimatch"):
        args = options.resolve_args(parse("semi", "--dataset", dataset, "--method", method))
        assert tuple(getattr(args, f) for f in flags) == expected and args.iters_per_epoch is None
        assert args.name == f"{dataset}_label{5 if dataset == 'demo' else 15}_{method}_0"
    args = options.resolve_args(
        parse(
            "semi",
            "--dataset",
            "pascal",
            "--method",
            "unimatch",
            "--lr",
            "0.002",
            "--lr_multi",
            "1",
            "--conf_thresh",
            "0",
            "--criterion",
            "ohem",
            "--epochs",
            "3",
            "--weight_decay",
            "5e-4",
            "--crop_size",
            "97",
            "97",
            "--apply_reco",
        )
    )
    assert tuple(getattr(args, f) for f in flags) == ((97, 97), 8, 0.002, 1.0, 3, 0.0, "ohem", 5e-4)
    assert args.name == "pascal_label15_unimatch_reco_0"
    mean_teacher = options.resolve_args(parse("semi", "--dataset", "pascal"))
    assert (mean_teacher.method, mean_teacher.lr, mean_teacher.weight_decay, mean_teacher.reco_weight) == (
        "meanteacher",
        2.5e-3,
        5e-4,
        1.0,
    )
    assert (mean_teacher.lr_multi, mean_teacher.conf_thresh, mean_teacher.criterion) == (None, None, None)
    assert options.resolve_args(parse("sup", "--dataset", "pascal")).method is None


def test_fixmatch_and_unimatch_epochs_are_one_pass_over_the_unlabelled_images():
    args = options.resolve_args(parse("semi", "--dataset", "pascal", "--method", "unimatch"))
    options.online_iterations(args, 10490, 4)  # UniMatch's 92 labels on 4 GPUs, batch 2: 1311 per epoch
    assert args.iters_per_epoch == 327  # here batch 8 per process: ceil(10490 / 4) // 8
    args.iters_per_epoch = None
    options.online_iterations(args, 17, 1)
    assert args.iters_per_epoch == 2
    args.iters_per_epoch = 5  # given: kept
    options.online_iterations(args, 17, 1)
    assert args.iters_per_epoch == 5
    with pytest.raises(
        helpers.UserError,
        match=r"--method unimatch: 7 unlabelled image\(s\) make less than "
        r"one batch \(--batch_size 8\): lower --batch_size",
    ):
        options.online_iterations(args, 7, 1)
    with pytest.raises(helpers.UserError, match="13 unlabelled image.s. over 2 processes make less than one"):
        options.online_iterations(args, 13, 2)


def test_table_fills_unset_flags():
    args = options.resolve_args(parse("semi", "--dataset", "pascal"))
    assert (args.batch_size, args.crop_size, args.epochs, args.iters_per_epoch) == (10, (321, 321), 200, 200)
    assert (args.resnet_depth, args.pretrained) == (101, "imagenet")
    args = options.resolve_args(
        parse("sup", "--dataset", "cityscapes", "--batch_size", "3", "--crop_size", "64", "96")
    )
    assert (args.batch_size, args.crop_size) == (3, (64, 96))


@pytest.mark.parametrize(
    "mode, argv, name",
    [
        ("sup", ["--dataset", "pascal", "--num_labels", "60"], "pascal_label60_sup_0"),
        (
            "sup",
            ["--dataset", "pascal", "--num_labels", "60", "--apply_reco", "--seed", "2"],
            "pascal_label60_sup_reco_2",
        ),
        (
            "semi",
            ["--dataset", "cityscapes", "--num_labels", "20", "--apply_aug", "classmix", "--apply_reco"],
            "cityscapes_label20_semi_classmix_reco_0",
        ),
        ("sup_partial", ["--partial", "p5", "--seed", "1"], "cityscapes_p5_sup_1"),
        ("semi_partial", ["--apply_aug", "cutmix"], "pascal_p0_semi_cutmix_0"),
    ],
)
def test_reference_file_names(mode, argv, name):
    assert options.resolve_args(parse(mode, *argv)).name == name


@pytest.mark.parametrize(
    "mode, argv, words",
    [
        ("sup_partial", ["--dataset", "sun"], "--dataset sun has no partial labels"),
        ("semi", ["--batch_size", "0"], "--batch_size must be positive"),
        (
            "semi_partial",
            ["--batch_size", "1"],
            "--batch_size 1: the semi-supervised step needs at least 2 images",
        ),
        ("semi", ["--iters_per_epoch", "-1"], "--iters_per_epoch must be positive"),
        ("semi", ["--apply_reco", "--num_queries", "0"], "--num_queries must be positive"),
        ("sup", ["--num_labels", "-3"], "--num_labels"),
        ("sup", ["--dataset", "imagenet"], "imagenet"),
        ("sup", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
        (
            "sup",
            ["--method", "unimatch"],
            "--method unimatch: train_sup.py trains on labels alone; the "
            "semi-supervised methods run with train_semisup.py --method unimatch",
        ),
        ("sup_partial", ["--method", "meanteacher"], "--method meanteacher: train_sup_partial.py trains on"),
        ("semi_partial", ["--method", "fixmatch"], "--method fixmatch with partial labels is not supported"),
        (
            "semi",
            ["--method", "unimatch", "--crop_size", "321", "513"],
            "--crop_size 321 513: --method unimatch "
            "trains on square crops, as UniMatch does; pass --crop_size S S",
        ),
        ("semi", ["--conf_thresh", "0.9"], "--conf_thresh is a flag of FixMatch and UniMatch: add --method"),
        ("sup", ["--lr_multi", "10"], "--lr_multi is a flag of FixMatch and UniMatch"),
        (
            "semi",
            ["--method", "fixmatch", "--conf_thresh", "1.5"],
            "--conf_thresh must be in [0, 1], got 1.5",
        ),
        ("semi", ["--reco_weight", "-1"], "--reco_weight must be >= 0"),
    ],
)
def test_bad_flags_name_the_flag(mode, argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        engine.main(mode, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value", [("--backbone", "resnet"), ("--apply_aug", "mixup"), ("--partial", "p3")]
)
def test_unknown_choices_are_refused_by_the_parser(flag, value, capsys):
    mode = "semi_partial"
    with pytest.raises(SystemExit) as exit_info:
        parse(mode, flag, value)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_nearest_keeps_label_values_and_dtype():
    labels = torch.randint(-1, 5, (2, 12, 12))
    small = methods.nearest(labels, (6, 6))
    assert small.dtype == labels.dtype and torch.equal(small, labels[:, ::2, ::2])
    mask = labels >= 0
    assert torch.equal(methods.nearest(mask, (6, 6)), mask[:, ::2, ::2])


def test_seed_all_is_a_pure_function_of_its_keys():
    distributed.seed_all("steps", 0, 3, 1)
    a = torch.rand(4), np.random.rand(), __import__("random").random()
    distributed.seed_all("steps", 0, 3, 1)
    b = torch.rand(4), np.random.rand(), __import__("random").random()
    distributed.seed_all("steps", 0, 3, 2)
    c = torch.rand(4)
    distributed.seed_all("init", 0, 3, 1)
    d = torch.rand(4)
    assert (
        torch.equal(a[0], b[0]) and a[1:] == b[1:] and not torch.equal(a[0], c) and not torch.equal(a[0], d)
    )


def test_atomic_save_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    helpers.atomic_save(lambda p: p.write_text("one"), target)

    def broken(p):
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        helpers.atomic_save(broken, target)
    assert target.read_text() == "one" and sorted(x.name for x in target.parent.iterdir()) == ["x.txt"]


def test_load_checkpoint_accepts_plain_and_resume_dicts(tmp_path):
    plain = {"a.weight": torch.ones(2)}
    torch.save({"module.a.weight": torch.ones(2)}, tmp_path / "ddp.pth")
    torch.save({"model": {"a.weight": torch.zeros(2)}, "teacher": plain, "epoch": 3}, tmp_path / "last.pth")
    assert torch.equal(network.load_state_dict(tmp_path / "ddp.pth")["a.weight"], torch.ones(2))
    assert torch.equal(network.load_state_dict(tmp_path / "last.pth")["a.weight"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        network.load_state_dict(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(helpers.UserError, match="bad.pth") as error:
        network.load_state_dict(tmp_path / "bad.pth")
    assert "\n" not in str(error.value)  # one line, whatever torch's message looked like


def test_resumed_outputs_keep_every_finished_epoch_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = argparse.Namespace(weights_dir=str(tmp_path / "w"), log_dir=str(tmp_path / "log"), name="run")
    columns = run_folder.metric_columns(False)
    metrics, model = np.random.default_rng(0).random((3, len(columns))), torch.nn.Linear(1, 1)
    out = run_folder.RunWriter(args, columns, start_epoch=0)
    for epoch in range(2):
        out.write_epoch(epoch, 0.1, metrics, model, is_best=True)
    out.close()
    out = run_folder.RunWriter(args, columns, start_epoch=2)  # resumed after two finished epochs
    out.write_epoch(2, 0.1, metrics, model, is_best=False)
    out.close()
    events = EventAccumulator(str(tmp_path / "log" / "run" / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("test_miou")] == [1, 2, 3]


def test_a_data_error_in_a_loader_worker_is_one_line(demo_root, capsys):
    dataset = build_data.SegmentationDataset(
        resolve_dataset("demo", demo_root), ["no_such_image"], "train", crop_size=(17, 17)
    )
    loader = build_data.build_train_loader(dataset, 1, 1, num_workers=1)
    with pytest.raises(SystemExit) as exit_info:
        helpers.run_cli(lambda argv: [batch for batch in loader])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image ") and "no_such_image.jpg is missing" in err
    assert err.count("\n") == 1 and "Traceback" not in err

"""The four training scripts end to end on the demo data: outputs, resume after SIGKILL, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from conftest import TINY_RECO, TINY_RUN, cli_args
from dataset_table import DATASETS
from helpers import UserError
from network import build_model
from splits import write_split_dir

REPO = Path(__file__).resolve().parents[1]
TINY = cli_args(**TINY_RUN, iters_per_epoch=2, **TINY_RECO)


def tiny_args(demo_root, tmp_path, *extra):
    return TINY + [
        "--data_root",
        str(demo_root),
        "--weights_dir",
        str(tmp_path / "w"),
        "--log_dir",
        str(tmp_path / "log"),
        *extra,
    ]


@pytest.mark.parametrize(
    "mode, extra, name, columns",
    [
        ("sup", ["--num_labels", "6", "--apply_reco"], "demo_label6_sup_reco_0", 6),
        (
            "semi",
            ["--num_labels", "6", "--apply_aug", "classmix", "--apply_reco"],
            "demo_label6_semi_classmix_reco_0",
            10,
        ),
        ("sup_partial", ["--partial", "p1"], "demo_p1_sup_0", 6),
        (
            "semi_partial",
            ["--partial", "p0", "--apply_aug", "cutmix", "--apply_reco"],
            "demo_p0_semi_cutmix_reco_0",
            10,
        ),
        ("semi", ["--num_labels", "6", "--method", "fixmatch"], "demo_label6_fixmatch_0", 11),
        (
            "semi",
            ["--num_labels", "6", "--method", "unimatch", "--apply_reco"],
            "demo_label6_unimatch_reco_0",
            13,
        ),
    ],
)
def test_each_script_trains_and_leaves_its_outputs(mode, extra, name, columns, demo_root, tmp_path, capsys):
    engine.main(mode, tiny_args(demo_root, tmp_path, "--epochs", "2", "--no_visual", *extra))
    out = capsys.readouterr().out
    assert out.count("EPOCH") == 2 and "mIoU" in out
    metrics = np.load(tmp_path / "log" / f"{name}.npy")
    assert metrics.shape == (2, columns) and np.isfinite(metrics[:, [0, -3, -2, -1]]).all()
    assert not np.isinf(metrics).any()  # NaN only as an "n/a" monitor: a p0 batch may hold no labelled pixel
    assert 0 <= metrics[:, -2].min() and metrics[:, -2].max() <= 1  # test mIoU
    state = torch.load(tmp_path / "w" / f"{name}.pth", weights_only=True)
    model = build_model("deeplabv3p", DATASETS["demo"].num_classes, output_dim=16, resnet_depth=18)
    model.load_state_dict(state)  # a plain state_dict, loadable strictly (as by the reference code)
    run_dir = tmp_path / "log" / name
    for f in ("last.pth", "metrics.csv", "curves.png", "split/labelled.txt", "split/unlabelled.txt"):
        assert (run_dir / f).is_file(), f
    assert any((run_dir / "tensorboard").iterdir())
    csv = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].split(",")[0] == "epoch" and len(csv[0].split(",")) == columns + 1
    labelled = (run_dir / "split/labelled.txt").read_text().split()
    assert len(labelled) == (
        6 if "label6" in name else len((demo_root / "train_aug.txt").read_text().split())
    )


def test_demo_run_draws_a_figure(demo_root, tmp_path):
    result = engine.train(
        engine.get_args_parser("semi").parse_args(
            tiny_args(demo_root, tmp_path, "--epochs", "1", "--apply_aug", "classmix")
        )
    )
    assert Path(result["figure"]).stat().st_size > 1000


def test_resume_refuses_nothing_and_foreign_runs(demo_root, tmp_path, capsys):
    argv = tiny_args(demo_root, tmp_path, "--epochs", "1", "--no_visual", "--num_labels", "4")
    with pytest.raises(SystemExit):
        engine.main("sup", argv + ["--resume"])
    assert "nothing to resume" in capsys.readouterr().err
    engine.main("sup", argv)
    (tmp_path / "log" / "demo_label4_sup_0" / "config.json").unlink()  # as made before config.json existed
    engine.main("sup", argv + ["--resume"])  # resumes after its last epoch: straight to its summary
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert (tmp_path / "log" / "demo_label4_sup_0" / "config.json").is_file()
    with pytest.raises(SystemExit):
        engine.main("sup", argv + ["--resume", "--lr", "0.1"])
    assert "--lr 0.01 (now 0.1)" in capsys.readouterr().err  # the demo's lr
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        engine.main("sup", argv + ["--resume", str(tmp_path / "garbage.pth")])
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --resume: ") and "garbage.pth cannot be read" in err and err.count("\n") == 1
    )


def test_resume_refuses_another_teacher_rule(demo_root, tmp_path, capsys):
    argv = tiny_args(demo_root, tmp_path, "--epochs", "1", "--no_visual", "--num_labels", "4")
    engine.main("semi", argv)
    with pytest.raises(SystemExit):
        engine.main("semi", argv + ["--resume", "--ema_buffers"])
    assert "--ema_buffers False (now True)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine.main(
            "semi",
            argv
            + ["--resume", str(tmp_path / "log/demo_label4_semi_cutout_0/last.pth"), "--method", "fixmatch"],
        )
    assert "--method meanteacher (now fixmatch)" in capsys.readouterr().err
    last = tmp_path / "log/demo_label4_semi_cutout_0/last.pth"  # as written before --method and --reco_weight
    state = torch.load(last, weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("method", "reco_weight")}
    torch.save(state, last)
    engine.main("semi", argv + ["--resume"])
    assert "resuming at epoch 2" in capsys.readouterr().out


def test_an_output_folder_that_is_a_file_is_one_line(demo_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        engine.main(
            "sup", tiny_args(demo_root, tmp_path, "--epochs", "1", "--log_dir", str(tmp_path / "afile"))
        )
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and err.startswith("error: ") and "afile" in err and "Traceback" not in err
    )


def test_split_dir_sets_the_budget_and_the_run_name(demo_root, tmp_path):
    ids = (demo_root / "train_aug.txt").read_text().split()
    write_split_dir(tmp_path / "split", ids[:3], ids[3:])
    engine.main(
        "sup",
        tiny_args(
            demo_root, tmp_path, "--epochs", "1", "--no_visual", "--split_dir", str(tmp_path / "split")
        ),
    )
    assert (tmp_path / "log/demo_label3_sup_0/split/labelled.txt").read_text().split() == ids[:3]
    with pytest.raises(UserError, match="--split_dir"):
        engine.resolve_args(
            engine.get_args_parser("sup_partial").parse_args(
                ["--dataset", "demo", "--split_dir", str(tmp_path / "split")]
            )
        )


def test_unimatch_records_its_defaults_and_refuses_too_few_unlabelled_images(demo_root, tmp_path, capsys):
    ids = (demo_root / "train_aug.txt").read_text().split()
    write_split_dir(tmp_path / "split", ids[:4], ids[4:7])
    argv = tiny_args(demo_root, tmp_path, "--split_dir", str(tmp_path / "split"), "--method", "unimatch")
    at = argv.index("--iters_per_epoch")
    del argv[at : at + 2]  # unset: one pass over the 3 unlabelled images
    engine.main("semi", [*argv, "--epochs", "1", "--no_visual"])
    config = json.loads((tmp_path / "log" / "demo_label4_unimatch_0" / "config.json").read_text())["args"]
    assert (config["iters_per_epoch"], config["lr"], config["lr_multi"], config["weight_decay"]) == (
        1,
        0.01,
        1.0,
        1e-4,
    )
    assert (config["method"], config["conf_thresh"], config["criterion"], config["reco_weight"]) == (
        "unimatch",
        0.95,
        "ce",
        1.0,
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        engine.main("semi", [*argv, "--batch_size", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "error: --method unimatch: 3 unlabelled image(s) make less than one batch (--batch_size 4)"
    )


def test_num_labels_larger_than_the_pool_is_refused(demo_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        engine.main("semi", tiny_args(demo_root, tmp_path, "--num_labels", "100000"))
    assert "cannot pick 100000 labelled images: the training list has 240" in capsys.readouterr().err


def script(name, argv, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)  # torch's default threads: runs must repeat with them too
    return subprocess.Popen(
        [sys.executable, str(REPO / name), *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(demo_root, tmp_path):
    common = [
        "--epochs",
        "2",
        "--iters_per_epoch",
        "2",
        "--no_visual",
        "--num_labels",
        "6",
        "--apply_aug",
        "cutmix",
        "--apply_reco",
        "--device",
        "cpu",  # bit-identical on the CPU (CUDA kernels may use atomics)
        "--num_queries",
        "256",
        "--output_dim",
        "128",
    ]  # ReCo's backward large enough to use every thread
    straight = script("train_semisup.py", tiny_args(demo_root, tmp_path / "a", *common))
    killed = script("train_semisup.py", tiny_args(demo_root, tmp_path / "b", *common))
    for line in killed.stdout:  # kill during the second epoch, after the first was saved
        if line.startswith("EPOCH    1"):
            time.sleep(0.3)
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = script("train_semisup.py", tiny_args(demo_root, tmp_path / "b", *common, "--resume"))
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0 and straight.returncode == 0, out_resumed + out_straight
    assert "resuming at epoch 2" in out_resumed and out_resumed.count("EPOCH") == 1
    name = "demo_label6_semi_cutmix_reco_0"
    a = torch.load(tmp_path / "a/log" / name / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b/log" / name / "last.pth", weights_only=True)
    for key in ("model", "teacher"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["metrics"], b["metrics"])


def torchrun(script, argv):
    """Run a script as 2 CPU processes under torchrun (gloo); it must succeed."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            *argv,
        ],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_torchrun_resume(demo_root, tmp_path):
    argv = tiny_args(
        demo_root, tmp_path, "--epochs", "2", "--no_visual", "--num_labels", "6", "--device", "cpu"
    )
    torchrun(REPO / "train_semisup.py", argv)
    last = tmp_path / "log/demo_label6_semi_cutout_0/last.pth"
    state = torch.load(last, weights_only=True)
    state["epoch"] = 1  # rewind one epoch, as if the job had died during the second
    torch.save(state, last)
    done = torchrun(REPO / "train_semisup.py", argv + ["--resume"])
    assert "resuming at epoch 2" in done.stdout and done.stdout.count("EPOCH") == 1


@pytest.mark.slow
def test_torchrun_two_cpu_processes(demo_root, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, engine\n"
        "def say(*words):  # one write per line: the ranks share stdout, and unbuffered prints interleave\n"
        "    sys.stdout.write(' '.join(map(str, words)) + '\\n')\n"
        "    sys.stdout.flush()\n"
        "evaluate = engine.evaluate\n"
        "def checked(model, *a, **k):  # the evaluated (and saved) weights, buffers included\n"
        "    total = sum(float(t.double().sum()) for t in model.state_dict().values())\n"
        "    say('RANK', os.environ['RANK'], 'WEIGHTS', repr(total))\n"
        "    return evaluate(model, *a, **k)\n"
        "engine.evaluate = checked\n"
        "r = engine.train(engine.get_args_parser('semi').parse_args(sys.argv[1:]))\n"
        "say('RANK', os.environ['RANK'], 'BEST', repr(r['best_miou']))\n"
    )
    argv = tiny_args(
        demo_root,
        tmp_path,
        "--epochs",
        "1",
        "--no_visual",
        "--num_labels",
        "6",
        "--apply_reco",
        "--device",
        "cpu",
    )
    done = torchrun(probe, argv)
    best = {
        line.split()[1]: line.split()[3]
        for line in done.stdout.splitlines()
        if line.startswith("RANK") and "BEST" in line
    }
    assert set(best) == {"0", "1"} and best["0"] == best["1"], done.stdout
    # every rank evaluates the weights rank 0 saves (BN statistics included)
    weights = {
        line.split()[1]: line.split()[3]
        for line in done.stdout.splitlines()
        if line.startswith("RANK") and "WEIGHTS" in line
    }
    assert set(weights) == {"0", "1"} and weights["0"] == weights["1"], done.stdout
    assert done.stdout.count("EPOCH") == 1  # only rank 0 reports
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["demo_label6_semi_cutout_reco_0.pth"]


@pytest.mark.parametrize(
    "amp",
    [
        "bf16",
        pytest.param(
            "fp16",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="fp16 kernels on a CPU are emulated and take a minute"
            ),
        ),
    ],
)
def test_mixed_precision_runs(amp, small_demo, tmp_path):
    # the small demo: bf16 convolutions are emulated on CPUs without bf16 instructions (80 s on 48 val images)
    result = engine.train(
        engine.get_args_parser("semi").parse_args(
            tiny_args(
                small_demo,
                tmp_path,
                "--epochs",
                "1",
                "--no_visual",
                "--num_labels",
                "6",
                "--apply_reco",
                "--amp",
                amp,
            )
        )
    )
    metrics = np.load(tmp_path / "log" / "demo_label6_semi_cutout_reco_0.npy")
    assert np.isfinite(metrics).all() and 0 <= result["best_miou"] <= 1

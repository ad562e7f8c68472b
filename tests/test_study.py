"""study.py: a grid of real training runs that is stopped once (SIGTERM), fails once and is restarted, then
its report checked against the runs' own .npy logs; --print; the refusal of mixed configurations; runs known
only by name; --paper; what a first study met (stop signals, flags, paths, split columns, missing seeds)."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import run_folder
import study
import study_report
from helpers import UserError

REPO = Path(__file__).resolve().parents[1]
# 4 cells, run seed by seed: sup 0, classmix 0, sup 1, classmix 1
GRID = ["--seeds", "0", "1", "--num_labels", "4", "--methods", "sup", "classmix"]


def training_flags(root: Path) -> list[str]:
    return [
        "--",
        "--dataset",
        "demo",
        "--data_root",
        str(root),
        "--epochs",
        "2",
        "--iters_per_epoch",
        "1",
        "--batch_size",
        "2",
        "--crop_size",
        "33",
        "33",
        "--num_workers",
        "0",
        "--no_visual",
    ]


def run_study(out: Path, root: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "study.py"),
            "run",
            "--out",
            str(out),
            *GRID,
            *more,
            *training_flags(root),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )


def table_state(stdout: str, method: str, budget: str, seed: int) -> str:
    """The state column of one cell in the table study.py run prints."""
    for line in stdout.splitlines():
        fields = line.split(None, 3)
        if fields[:3] == [method, budget, str(seed)]:
            return fields[3].rsplit("  ", 1)[0].strip()
    raise AssertionError(f"no row for {method} {budget} {seed} in:\n{stdout}")


@pytest.mark.slow
def test_a_grid_is_killed_once_fails_once_resumes_and_reports_its_logs(small_demo, tmp_path, capsys):
    out = tmp_path / "study"
    cell = lambda method, budget, seed: out / "cells" / method / str(budget) / f"seed{seed}"  # noqa: E731
    # stop the study (kill PID) once the 2nd cell has finished its first epoch: the cell saves and stops
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "study.py"),
            "run",
            "--out",
            str(out),
            *GRID,
            *training_flags(small_demo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim_log = cell("classmix", 4, 0) / "cell.log"
    while first.poll() is None and not (victim_log.is_file() and "EPOCH    1" in victim_log.read_text()):
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    stopped = first.communicate()[0]
    assert first.returncode == 143, stopped
    assert table_state(stopped, "classmix", "4", 0) == "stopped by SIGTERM, resumes on the next run"
    assert table_state(stopped, "sup", "4", 1) == "not started"
    assert len(list((cell("classmix", 4, 0) / "log").glob("*/last.pth"))) == 1

    # --print lists the cells still to run, the interrupted one with --resume
    capsys.readouterr()
    study.main(["run", "--out", str(out), *GRID, "--print", *training_flags(small_demo)])
    lines = capsys.readouterr().out.splitlines()
    commands = {
        (Path(a[1]).name, a[a.index("--num_labels") + 1], a[a.index("--seed") + 1]): a
        for a in map(shlex.split, lines)
    }
    assert len(lines) == len(commands) == 3  # 4 cells, 1 finished (sup of seed 0)
    assert ("train_sup.py", "4", "0") not in commands
    assert commands[("train_semisup.py", "4", "0")][-1] == "--resume"
    assert commands[("train_sup.py", "4", "1")][-1] != "--resume"
    assert all(a[a.index("--log_dir") + 1].startswith(str(out / "cells")) for a in commands.values())

    # a cell that cannot start (its --weights_dir is a file) fails; the others go on, two at a time
    cell("sup", 4, 1).mkdir(parents=True)
    (cell("sup", 4, 1) / "weights").write_text("in the way")
    done_before = (cell("sup", 4, 0) / "log" / "demo_label4_sup_0.npy").stat().st_mtime_ns
    second = run_study(out, small_demo, "--gpus", "a", "b")  # the GPU ids are unused on a CPU
    assert second.returncode == 1, second.stdout + second.stderr
    assert table_state(second.stdout, "sup", "4", 1).startswith("FAILED (exit 2): error: ")
    assert table_state(second.stdout, "classmix", "4", 0) == "resumed, done"
    assert table_state(second.stdout, "sup", "4", 0) == "skipped (finished before)"
    assert table_state(second.stdout, "classmix", "4", 1) == "done"
    assert "resuming at epoch" in (cell("classmix", 4, 0) / "cell.log").read_text()
    assert (cell("sup", 4, 0) / "log" / "demo_label4_sup_0.npy").stat().st_mtime_ns == done_before

    (cell("sup", 4, 1) / "weights").unlink()
    third = run_study(out, small_demo)
    assert third.returncode == 0, third.stdout + third.stderr
    assert table_state(third.stdout, "sup", "4", 1) == "done"
    assert sum("skipped" in line for line in third.stdout.splitlines()) == 3

    study.main(["report", str(out)])
    logs = {}
    for npy in out.glob("cells/*/*/seed*/log/*.npy"):
        method, budget = npy.parents[3].name, npy.parents[2].name
        logs.setdefault((method, budget), []).append(np.load(npy)[:, -2])  # the val mIoU column
    rows = {(r["method"], r["budget"]): r for r in csv.DictReader((out / "report.csv").open())}
    assert set(rows) == set(logs) == {("sup", "4"), ("classmix", "4")}
    for key, mious in logs.items():
        best, final = 100 * np.array([m.max() for m in mious]), 100 * np.array([m[-1] for m in mious])
        row = rows[key]
        assert row["n"] == "2" and row["seeds"] == "0 1"
        for name, values in (("best", best), ("final", final)):
            assert float(row[f"{name}_mean"]) == pytest.approx(values.mean(), abs=1e-4)
            assert float(row[f"{name}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-4)
    sup4 = 100 * np.array([m.max() for m in logs[("sup", "4")]])
    assert f"| sup | {sup4.mean():.2f} ± {sup4.std(ddof=1):.2f} (2) |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 5000


# ---------------------------------------------------------------------------------------------
# reports of synthetic run folders (no training)
# ---------------------------------------------------------------------------------------------


def fake_run(
    log_dir: Path,
    mode: str,
    seed: int,
    miou: list[float],
    num_labels: int = 60,
    aug: str = "classmix",
    reco: bool = False,
    dataset: str = "demo",
    config: bool = True,
    epochs: int | None = None,
    method: str = "meanteacher",
    **flags,
) -> Path:
    """A run as the engine leaves it: {log_dir}/{name}.npy (val mIoU column filled) and {name}/config.json."""
    semi = mode.startswith("semi")
    kind = (method if method != "meanteacher" else "semi_" + aug) if semi else "sup"
    name = f"{dataset}_label{num_labels}_{kind}{'_reco' if reco else ''}_{seed}"
    columns = {"meanteacher": 10, "fixmatch": 11, "unimatch": 13}[method] if semi else 6
    metrics = np.zeros((epochs or len(miou), columns))
    metrics[: len(miou), -2], metrics[: len(miou), -3] = miou, 1.0
    log_dir.mkdir(parents=True, exist_ok=True)
    np.save(log_dir / f"{name}.npy", metrics)
    if config:
        args = {
            "dataset": dataset,
            "num_labels": num_labels,
            "partial": None,
            "seed": seed,
            "apply_aug": aug,
            "apply_reco": reco,
            "name": name,
            "lr": 0.0025,
            "epochs": epochs or len(miou),
            "backbone": "deeplabv3p",
            "data_root": str(log_dir / f"data{seed}"),
            "log_dir": str(log_dir),
            "split_dir": None,
            "train_mode": mode,
            "method": method if semi else None,
        } | flags
        (log_dir / name).mkdir()
        (log_dir / name / "config.json").write_text(
            json.dumps(
                {
                    "args": args,
                    "split_digest": "0" * 64,
                    "torch": "2",
                    "torchvision": "0",
                    "device": "cpu",
                    "world_size": 1,
                    "mode": mode,
                    "script": "train_semisup.py" if semi else "train_sup.py",
                }
            )
        )
    return log_dir


def test_report_refuses_runs_of_another_configuration(tmp_path):
    fake_run(tmp_path / "a", "sup", 0, [0.3, 0.4])
    fake_run(
        tmp_path / "a", "semi", 1, [0.3, 0.5], num_labels=200, reco=True
    )  # other axes, another data_root: fine
    fake_run(
        tmp_path / "a", "semi", 3, [0.3, 0.5], save_every=50
    )  # how often it saved: how it was kept, fine
    fake_run(tmp_path / "b", "semi", 2, [0.2, 0.1], lr=0.01)
    study.main(["report", str(tmp_path / "a")])
    with pytest.raises(UserError) as refused:
        study.main(["report", str(tmp_path / "a"), str(tmp_path / "b")])
    message = str(refused.value)
    assert (
        "--lr 0.0025 (3 runs" in message and "0.01 (1 run, e.g. " in message and "--data_root" not in message
    )
    with pytest.raises(UserError, match="--world_size|world_size 1"):
        fake_run(tmp_path / "c", "sup", 3, [0.2, 0.2])
        config = tmp_path / "c" / "demo_label60_sup_3" / "config.json"
        config.write_text(config.read_text().replace('"world_size": 1', '"world_size": 2'))
        study.main(["report", str(tmp_path / "a"), str(tmp_path / "c")])
    fake_run(tmp_path / "e", "sup", 4, [0.3, 0.35], amp="bf16")
    with pytest.raises(UserError, match=r'--amp unset \(3 runs, .* vs "bf16" \(1 run'):
        study.main(["report", str(tmp_path / "a"), str(tmp_path / "e")])
    fake_run(tmp_path / "d", "sup", 0, [0.3, 0.35])  # the cell sup, 60 labels, seed 0 a second time
    with pytest.raises(UserError, match="sup at 60 labels, seed 0 was run more than once"):
        study.main(["report", str(tmp_path / "a"), str(tmp_path / "d")])


def test_report_reads_logs_without_config_by_their_names_and_leaves_out_unfinished_runs(tmp_path):
    logs = tmp_path / "logging"
    for seed, miou in enumerate(([0.2, 0.6, 0.5], [0.4, 0.3, 0.45], [0.1, 0.2, 0.3])):
        fake_run(logs, "semi", seed, miou, aug="cutmix", reco=True, config=False)
    fake_run(logs, "sup", 0, [0.2], epochs=3, config=False)  # killed after its first epoch
    np.save(logs / "other.npy", np.ones(3))  # not a run log: ignored
    study.main(["report", str(logs), "--out", str(tmp_path / "r")])
    (row,) = csv.DictReader((tmp_path / "r" / "report.csv").open())
    assert (row["method"], row["budget"], row["n"]) == ("cutmix+reco", "60", "3")
    assert float(row["best_mean"]) == pytest.approx(100 * np.mean([0.6, 0.45, 0.3]), abs=1e-4)
    assert float(row["final_std"]) == pytest.approx(100 * np.std([0.5, 0.45, 0.3], ddof=1), abs=1e-4)
    md = (tmp_path / "r" / "report.md").read_text()
    assert (
        "file names only" in md
        and "Left out, unfinished: " in md
        and "demo_label60_sup_0.npy (1 epochs" in md
    )
    fake_run(tmp_path / "other", "sup", 0, [0.3], dataset="pascal", config=False)
    with pytest.raises(UserError, match='--dataset "demo"'):
        study.main(["report", str(logs), str(tmp_path / "other")])


def test_report_adds_the_published_numbers_of_the_reference_readme(tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path, "semi", seed, [0.5, 0.55 + seed / 100], reco=True, dataset="pascal")
    fake_run(tmp_path, "sup", 0, [0.3, 0.32], num_labels=200, dataset="pascal")
    study.main(["report", str(tmp_path), "--paper", "pascal"])
    md = (tmp_path / "report.md").read_text()
    assert "| classmix+reco | 55.50 ± 0.71 (2) | – |" in md and "| sup | – | 32.00 (1) |" in md
    assert (
        "| classmix+reco (paper) | 57.12 (paper) | – |" in md and "| sup (paper) | 36.06 (paper) | – |" in md
    )
    assert "`--backbone deeplabv3p --dataset pascal --epochs 2 --lr 0.0025`" in md
    assert "paper,classmix,60,1,53.71" in (tmp_path / "report.csv").read_text()
    with pytest.raises(UserError, match="--paper cityscapes: these runs are on pascal"):
        study.main(["report", str(tmp_path), "--paper", "cityscapes"])


# ---------------------------------------------------------------------------------------------
# study.py run: its checks and its cells (no training)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_labels", "60", "--methods", "mixup"], "--methods: unknown method 'mixup'"),
        (["--num_labels", "60", "--methods", "sup+cutmix"], "--methods: unknown method 'sup+cutmix'"),
        (["--partial", "p2", "--methods", "sup"], "--partial p2: choose among p0, p1, p5, p25"),
        (
            ["--partial", "p0", "--script", "train_semisup.py", "--methods", "sup"],
            "--script train_semisup.py does not",
        ),
        (
            ["--num_labels", "60", "--methods", "sup", "--", "--seed", "3"],
            "--seed is set by the study for each cell",
        ),
        (["--num_labels", "60", "--methods", "sup", "--", "--log_dir=x"], "--log_dir is set by the study"),
        (["--split_dirs", "nowhere", "--methods", "sup"], "--split_dirs: nowhere has no labelled.txt"),
        (["--num_labels", "60", "60", "--methods", "sup"], "repeat a name"),
        (
            ["--partial", "p0", "--methods", "unimatch"],
            "--methods unimatch: FixMatch and UniMatch do not train",
        ),
        (
            ["--num_labels", "60", "--methods", "unimatch", "--", "--method", "fixmatch"],
            "--method is set by the",
        ),
    ],
)
def test_run_refuses_a_bad_grid(argv, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        study.main(["run", "--out", str(tmp_path), *argv])


def test_run_refuses_to_continue_a_study_with_other_training_flags(tmp_path, capsys):
    grid = ["run", "--out", str(tmp_path), "--num_labels", "60", "--methods", "sup", "--seeds", "0"]
    study.check_study_file(tmp_path, False, ["--epochs", "2"])
    changed = (
        r"study.json: this study ran its cells with other training flags "
        r"\(--epochs 2 before, --epochs 3 now\)"
    )
    with pytest.raises(UserError, match=changed + ".*pass the same flags"):
        study.main(grid + ["--", "--epochs", "3"])


def test_cells_pick_scripts_and_flags_for_partial_labels_and_splits(tmp_path, capsys):
    study.main(
        [
            "run",
            "--out",
            str(tmp_path),
            "--partial",
            "p0",
            "p25",
            "--methods",
            "sup+reco",
            "cutout",
            "--seeds",
            "4",
            "--print",
        ]
    )
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [(Path(a[1]).name, a[2:4], "--apply_reco" in a) for a in lines] == [
        ("train_sup_partial.py", ["--partial", "p0"], True),
        ("train_semisup_partial.py", ["--partial", "p0"], False),
        ("train_sup_partial.py", ["--partial", "p25"], True),
        ("train_semisup_partial.py", ["--partial", "p25"], False),
    ]
    assert lines[1][lines[1].index("--apply_aug") + 1] == "cutout" and "--seed" in lines[0]
    study.main(
        [
            "run",
            "--out",
            str(tmp_path / "b"),
            "--splits",
            "pascal/92",
            "--methods",
            "classmix",
            "--seeds",
            "0",
            "--print",
        ]
    )
    line = capsys.readouterr().out
    assert (
        "--split pascal/92" in line
        and str(tmp_path / "b" / "cells" / "classmix" / "pascal_92" / "seed0") in line
    )


def test_a_cell_runs_on_its_own_gpu_and_logs_its_output(tmp_path):
    cells = study.CellProcesses(["7"])
    cell = study.Cell("sup", "60", ("--num_labels", "60"), 0, tmp_path / "cell")
    code = study.run_cell(
        cell, [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"], cells
    )
    assert code == 0 and cells.gpus.get_nowait() == "7" and not cells.running
    log = (tmp_path / "cell" / "cell.log").read_text().splitlines()
    assert log[0].startswith("=== ") and log[1] == "7"
    cells.gpus.put(None)
    code = study.run_cell(
        cell, [sys.executable, "-c", "import sys; print('error: no data'); print('x'); sys.exit(2)"], cells
    )
    assert code == 2 and study.last_error(tmp_path / "cell" / "cell.log") == "error: no data"


def test_a_cell_is_new_interrupted_or_done_by_its_run_folder(tmp_path):
    cell = study.Cell("classmix", "60", ("--num_labels", "60"), 0, tmp_path / "cell")
    assert cell.state() == "new"
    log_dir = fake_run(tmp_path / "cell" / "log", "semi", 0, [0.3], epochs=2)  # one of two epochs logged
    assert cell.state() == "new"  # died before its first last.pth: starts again
    (log_dir / "demo_label60_semi_classmix_0" / "last.pth").write_bytes(b"")
    assert cell.state() == "interrupted"
    (log_dir / "demo_label60_semi_classmix_0" / "summary.json").write_text("{}")
    assert cell.state() == "done"
    fake_run(tmp_path / "cell2" / "log", "semi", 0, [0.3, 0.0001])  # every epoch logged, no summary.json
    assert study.Cell("classmix", "60", (), 0, tmp_path / "cell2").state() == "done"
    (tmp_path / "cell2" / "log" / "another_run").mkdir()
    with pytest.raises(UserError, match="holds several runs"):
        study.Cell("classmix", "60", (), 0, tmp_path / "cell2").state()


# ---------------------------------------------------------------------------------------------
# what a first study met (each test: one problem found by running study.py as a new user would)
# ---------------------------------------------------------------------------------------------

FAKE_CELL = """
import os, pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):  # what a training script does: save last.pth, exit 128 + the signal
    run = folder / "log" / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "last.pth").write_bytes(b"")
    with open(folder / "signals", "a") as f:
        f.write(f"{signum}\\n")
    time.sleep(0.3)  # a second signal would arrive here
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("pgid", os.getpgid(0), flush=True)
time.sleep(15)  # the study stops it long before
"""


def signalled_study(tmp_path: Path, monkeypatch, signals: Sequence[int], *budgets: str) -> tuple[int, Path]:
    """(exit code, first cell's folder) of a study of fake cells (FAKE_CELL) that this process sends
    `signals`, 0.3 s apart, once the first cell runs: as `kill PID`, or Ctrl-C (the cell is in another
    process group)."""
    script = tmp_path / "cell.py"
    script.write_text(FAKE_CELL)
    monkeypatch.setattr(
        study.Cell, "command", lambda cell, *_: [sys.executable, str(script), str(cell.folder)]
    )
    first = tmp_path / "study" / "cells" / "sup" / budgets[0] / "seed0"

    def signal_the_study() -> None:
        while not ((first / "cell.log").is_file() and "pgid" in (first / "cell.log").read_text()):
            time.sleep(0.02)
        for signum in signals:
            os.kill(os.getpid(), signum)
            time.sleep(0.3)

    thread = threading.Thread(target=signal_the_study)
    thread.start()
    with pytest.raises(SystemExit) as stopped:
        argv = ["run", "--out", str(tmp_path / "study"), "--seeds", "0", "--num_labels", *budgets]
        study.main([*argv, "--methods", "sup"])
    thread.join()
    return stopped.value.code, first


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_the_running_cell_once_and_no_further_cell_starts(
    signum, tmp_path, capsys, monkeypatch
):
    missed = []  # a signal the study did not catch lands here, not in pytest

    def fallback(signum: int, frame: object) -> None:
        missed.append(signum)

    previous = {s: signal.signal(s, fallback) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code, first = signalled_study(tmp_path, monkeypatch, [signum], "4", "8")
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == fallback  # restored
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert missed == [] and code == 128 + signum
    assert (first / "signals").read_text() == f"{int(signum)}\n"  # passed on once
    # a terminal's Ctrl-C reaches the study's process group only, so the cell does not get it twice
    assert int((first / "cell.log").read_text().split("pgid ")[1].split()[0]) != os.getpgid(0)
    assert not (tmp_path / "study" / "cells" / "sup" / "8").exists()  # the next cell never started
    out, err = capsys.readouterr()
    assert (
        table_state(out, "sup", "4", 0)
        == f"stopped by {signal.Signals(signum).name}, resumes on the next run"
    )
    assert table_state(out, "sup", "8", 0) == "not started"
    assert f"stopped by {signal.Signals(signum).name}" in err and "run the same command again" in err


def test_a_study_started_ignoring_sigint_leaves_it_ignored_and_stops_on_sigterm(tmp_path, monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts `python study.py run ... &`
    try:  # a Ctrl-C meant for the foreground job, then a scheduler's stop
        code, cell = signalled_study(tmp_path, monkeypatch, [signal.SIGINT, signal.SIGTERM], "4")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signal.SIGTERM
    assert (cell / "signals").read_text() == f"{int(signal.SIGTERM)}\n"  # SIGINT never reached the cell


def test_print_records_the_training_flags_and_a_change_is_refused_by_name(tmp_path, capsys):
    grid = [
        "run",
        "--out",
        str(tmp_path),
        "--num_labels",
        "60",
        "--methods",
        "sup",
        "--seeds",
        "0",
        "--print",
        "--",
    ]
    study.main(grid + ["--epochs", "2", "--lr", "0.01", "--no_visual"])  # a job array runs these lines
    study.main(grid + ["--no_visual", "--lr=0.01", "--epochs", "2"])  # the same flags in another order
    with pytest.raises(UserError) as refused:
        study.main(grid + ["--epochs", "3", "--no_visual", "--amp", "bf16"])
    message = str(refused.value)
    assert "study.json" in message and "--epochs 2 before, --epochs 3 now" in message
    assert (
        "--lr 0.01 before, not given now" in message and "--amp not given before, --amp bf16 now" in message
    )
    assert "--no_visual" not in message


def test_run_refuses_an_unknown_standard_split_before_any_cell(tmp_path):
    with pytest.raises(
        UserError, match="--splits pascal/93 is not a shipped split: choose among .*pascal/92"
    ):
        study.main(
            [
                "run",
                "--out",
                str(tmp_path),
                "--splits",
                "pascal/92",
                "pascal/93",
                "--methods",
                "sup",
                "--print",
            ]
        )
    with pytest.raises(UserError, match="--splits pascal/92 is a split of pascal, not of --dataset demo"):
        study.main(
            [
                "run",
                "--out",
                str(tmp_path),
                "--splits",
                "pascal/92",
                "--methods",
                "sup",
                "--print",
                "--",
                "--dataset=demo",
            ]
        )


def test_report_keeps_two_splits_of_one_size_apart_and_orders_columns_by_size(tmp_path):
    for split, size in (("pascal/u2pl_1_16", 662), ("pascal/1_16", 662), ("pascal/92", 92)):
        for seed in (0, 1):
            fake_run(
                tmp_path / split.replace("/", "_"),
                "sup",
                seed,
                [0.3, 0.4 + seed / 10],
                num_labels=size,
                dataset="pascal",
                split=split,
                split_dir=str(tmp_path / "splits" / split),
            )
    study.main(["report", str(tmp_path)])
    rows = [(r["budget"], r["n"]) for r in csv.DictReader((tmp_path / "report.csv").open())]
    assert rows == [("pascal/92", "2"), ("pascal/1_16", "2"), ("pascal/u2pl_1_16", "2")]
    md = (tmp_path / "report.md").read_text()
    assert (
        "| method | pascal/92 | pascal/1_16 | pascal/u2pl_1_16 |" in md and "columns: labelled images" in md
    )


def test_report_gives_each_methods_gain_over_sup_seed_by_seed(tmp_path):
    for seed, (sup, semi) in enumerate([(0.30, 0.36), (0.40, 0.38), (0.35, 0.45)]):
        fake_run(tmp_path, "sup", seed, [0.1, sup], num_labels=5)
        fake_run(tmp_path, "semi", seed, [semi, 0.2], num_labels=5, reco=True)
        fake_run(tmp_path, "sup", seed, [0.6, 0.6], num_labels=0)  # no semi run at this budget: no column
    fake_run(tmp_path, "semi", 3, [0.9, 0.9], num_labels=5)  # no sup run of seed 3: nothing to pair with
    study.main(["report", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    gains = np.array([6.0, -2.0, 10.0])
    header = "## Gain over sup on the same labelled images (best val mIoU, points), columns: labelled images"
    assert f"{header}\n\n| method | 5 |\n" in md
    assert f"| classmix+reco | {gains.mean():+.2f} ± {gains.std(ddof=1):.2f} (3, better on 2) |" in md
    assert "| classmix |" not in md.split("## Gain")[1]


def test_report_adds_the_gain_over_the_supervised_runs_of_a_baseline_folder(tmp_path, capsys):
    study_dir, base = tmp_path / "study", tmp_path / "sup_b2"
    for seed, (sup, semi, alone) in enumerate([(0.40, 0.36, 0.30), (0.42, 0.38, 0.37), (0.50, 0.45, 0.41)]):
        fake_run(study_dir, "sup", seed, [0.1, sup], num_labels=5, batch_size=4)
        fake_run(study_dir, "semi", seed, [semi, 0.2], num_labels=5, batch_size=4)
        fake_run(base, "sup", seed, [alone, 0.1], num_labels=5, batch_size=2)
    fake_run(base, "sup", 7, [0.9, 0.9], num_labels=5, batch_size=2)  # no study run of seed 7: no pair
    study.main(["report", str(study_dir), "--baseline", str(base)])
    md = (study_dir / "report.md").read_text()
    assert f"## Gain over sup in {base}, which ran at --batch_size 2 (best val mIoU, points)" in md
    table = md.split(f"## Gain over sup in {base}")[1]
    for method, gains in (("sup", [10.0, 5.0, 9.0]), ("classmix", [6.0, 1.0, 4.0])):
        g = np.array(gains)
        assert f"| {method} | {g.mean():+.2f} ± {g.std(ddof=1):.2f} (3, better on 3) |" in table
    # the study's own gain table is unchanged by it
    assert "| classmix | -4.33 ± 0.58 (3, better on 0) |" in md.split("## Gain over sup on the same")[1]

    fake_run(tmp_path / "semi_only", "semi", 0, [0.5, 0.5], num_labels=5)
    fake_run(tmp_path / "other_data", "sup", 0, [0.5, 0.5], num_labels=5, dataset="pascal")
    for folder, expected in (("semi_only", "no finished supervised run"), ("other_data", "on pascal")):
        with pytest.raises(UserError, match=f"--baseline {tmp_path / folder}: .*{expected}"):
            study.main(["report", str(study_dir), "--baseline", str(tmp_path / folder)])


def test_report_names_an_own_data_folder_and_the_seeds_a_cell_lacks(tmp_path):
    for seed in (0, 1, 2):
        fake_run(tmp_path, "sup", seed, [0.3, 0.4], dataset="folder", data_root=str(tmp_path / "leaves"))
    fake_run(tmp_path, "semi", 1, [0.3, 0.5], dataset="folder", data_root=str(tmp_path / "leaves"))
    study.main(["report", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert md.startswith(f"# Study report: folder {tmp_path / 'leaves'}\n")
    assert "Seeds missing (these cells' means are over fewer seeds): classmix at 60 lacks 0 2." in md


def test_split_folders_are_columns_by_their_size_as_the_report_names_them(tmp_path, capsys):
    for name, size in (("draw_a", 3), ("draw_b", 5), ("draw_c", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "labelled.txt").write_text("".join(f"{i}\n" for i in range(size)))
        (tmp_path / name / "unlabelled.txt").write_text("9\n")
    grid = [
        "run",
        "--out",
        str(tmp_path / "study"),
        "--methods",
        "sup",
        "--seeds",
        "0",
        "--print",
        "--split_dirs",
    ]
    study.main(grid + [str(tmp_path / "draw_b"), str(tmp_path / "draw_a")])
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a[a.index("--split_dir") + 1], a[a.index("--log_dir") + 1]) for a in lines] == [
        (str(tmp_path / f"draw_{d}"), str(tmp_path / "study" / "cells" / "sup" / n / "seed0" / "log"))
        for d, n in (("b", "5"), ("a", "3"))
    ]
    with pytest.raises(
        UserError, match=r"repeat a name; .*split folders of one size belong to separate studies"
    ):
        study.main(grid + [str(tmp_path / "draw_a"), str(tmp_path / "draw_c")])


def test_printed_lines_run_from_any_folder_with_a_relative_data_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet.pth").write_bytes(b"")
    study.main(
        [
            "run",
            "--out",
            "study",
            "--num_labels",
            "4",
            "--methods",
            "sup",
            "--seeds",
            "0",
            "--print",
            "--",
            "--data_root",
            "own",
            "--pretrained",
            "resnet.pth",
            "--lr",
            "0.01",
        ]
    )
    line = shlex.split(capsys.readouterr().out)
    assert line[line.index("--data_root") + 1] == str(tmp_path / "own")
    assert line[line.index("--pretrained") + 1] == str(tmp_path / "resnet.pth") and "0.01" in line
    study.main(
        [
            "run",
            "--out",
            str(tmp_path / "study"),
            "--num_labels",
            "4",
            "--methods",
            "sup",
            "--seeds",
            "0",
            "--print",
            "--",
            "--data_root",
            str(tmp_path / "own"),
            "--pretrained=resnet.pth",
            "--lr",
            "0.01",
        ]
    )


def test_every_label_is_the_column_all_in_the_study_as_in_the_report(tmp_path, capsys):
    study.main(
        ["run", "--out", str(tmp_path), "--num_labels", "0", "--methods", "sup", "--seeds", "0", "--print"]
    )
    line = shlex.split(capsys.readouterr().out)
    assert line[line.index("--log_dir") + 1] == str(tmp_path / "cells" / "sup" / "all" / "seed0" / "log")
    fake_run(tmp_path / "cells" / "sup" / "all" / "seed0" / "log", "sup", 0, [0.3, 0.4], num_labels=0)
    study.main(["report", str(tmp_path)])
    assert [r["budget"] for r in csv.DictReader((tmp_path / "report.csv").open())] == ["all"]


def test_fixmatch_and_unimatch_cells_pass_their_method_and_are_named_by_it(tmp_path, capsys):
    study.main(
        [
            "run",
            "--out",
            str(tmp_path),
            "--num_labels",
            "60",
            "--methods",
            "classmix",
            "fixmatch",
            "unimatch+reco",
            "--seeds",
            "0",
            "--print",
        ]
    )
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [
        (
            Path(a[1]).name,
            a[a.index("--method") + 1] if "--method" in a else None,
            "--apply_aug" in a,
            "--apply_reco" in a,
            Path(a[a.index("--log_dir") + 1]).parent.parent.parent.name,
        )
        for a in lines
    ] == [
        ("train_semisup.py", None, True, False, "classmix"),
        ("train_semisup.py", "fixmatch", False, False, "fixmatch"),
        ("train_semisup.py", "unimatch", False, True, "unimatch+reco"),
    ]


def test_report_takes_each_methods_own_defaults_and_adds_unimatchs_published_numbers(tmp_path):
    pascal = dict(dataset="pascal", num_labels=92, split="pascal/92")
    for seed in (0, 1):
        fake_run(tmp_path / "a", "semi", seed, [0.6, 0.7], **pascal)
        fake_run(
            tmp_path / "a",
            "semi",
            seed,
            [0.7, 0.74 + seed / 100],
            method="unimatch",
            reco=seed == 1,
            lr=0.001,
            lr_multi=10.0,
            batch_size=8,
            **pascal,
        )
        fake_run(tmp_path / "a", "sup", seed, [0.4, 0.45], **pascal)
    study.main(["report", str(tmp_path / "a"), "--paper", "pascal"])  # lr, batch differ by method: one study
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| unimatch | 74.00 (1) |" in md and "| unimatch+reco | 75.00 (1) |" in md and "--lr" not in md
    assert "| unimatch (paper) | 75.20 (paper) |" in md and "| sup (paper) | 45.10 (paper) |" in md
    assert "UniMatch's README" in md and "classmix (paper)" not in md  # ReCo's numbers are at 60 labels
    fake_run(
        tmp_path / "b",
        "semi",
        2,
        [0.7, 0.7],
        method="unimatch",
        lr=0.01,
        lr_multi=10.0,
        batch_size=8,
        **pascal,
    )
    with pytest.raises(UserError, match=r"--lr 0.001 \(2 runs.* vs 0.01 \(1 run"):  # UniMatch's must agree
        study.main(["report", str(tmp_path / "a"), str(tmp_path / "b")])
    fake_run(tmp_path / "c", "semi", 0, [0.5, 0.6], method="fixmatch", reco=True, config=False)
    record = run_folder.record_of_log(tmp_path / "c" / "demo_label60_fixmatch_reco_0.npy")
    assert study_report.run_log(record).method == "fixmatch+reco"


def test_the_report_says_which_runs_repeat_to_the_bit_and_their_threads(tmp_path):
    def record(name, device, deterministic, threads):
        folder = tmp_path / name
        folder.mkdir()
        config = {"args": {"name": name, "seed": 0}, "mode": "sup", "device": device, "world_size": 1}
        if threads is not None:  # configs written before the thread count was recorded lack both keys
            config |= {"deterministic": deterministic, "threads": threads}
        (folder / "config.json").write_text(json.dumps(config))
        found = run_folder.record_of_folder(folder)
        return study_report.RunLog(
            folder, name, "15", 15, 0, {}, "demo", np.zeros(1), True, found.repeatable, found.threads
        )

    runs = [
        record("cpu", "cpu", False, 2),
        record("gpu_det", "cuda:0", True, 8),
        record("gpu", "cuda:0", False, 8),
        record("old", "cpu", None, None),
    ]
    assert [r.repeatable for r in runs] == [True, True, False, None]
    line = study_report.repeatability_line(runs)
    assert line.startswith("Repeatable to the bit on their machine: 2 of 4 runs")
    assert "not (GPU without --deterministic): gpu 15 seed 0" in line
    assert "not recorded (older runs): old 15 seed 0" in line and "CPU threads: 2, 8 (they differ)" in line

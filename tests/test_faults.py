"""Faults of long runs: a stop signal mid-epoch, non-finite losses, a full disk, bad checkpoints, and an
elastic torchrun restart after a rank dies."""

import errno
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
import faults
import helpers
import methods
from build_data import EpochBatchSampler
from conftest import TINY_RECO, TINY_RUN, cli_args

REPO = Path(__file__).resolve().parents[1]


def argv_for(root, out, *extra):
    run = {"data_root": root, "weights_dir": out / "w", "log_dir": out / "log", "num_labels": 6}
    return [*cli_args(**TINY_RUN, **run, **TINY_RECO, no_visual=True, device="cpu"), *extra]


def last(out, name):
    return torch.load(out / "log" / name / "last.pth", weights_only=True)


def assert_same_run(a, b):
    for key in ("model", "teacher", "optimizer"):
        assert (key in a) == (key in b) and (key not in a or equal(a[key], b[key])), key
    assert torch.equal(a["metrics"], b["metrics"])


def equal(a, b) -> bool:
    """Nested dicts and lists of tensors and plain values, equal to the bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def every_step(monkeypatch, action):
    """Call action(step number from 1, run) before each optimisation step of this process."""
    original, count = engine.optimisation_step, [0]

    def step(run, *a, **k):
        count[0] += 1
        action(count[0], run)
        return original(run, *a, **k)

    monkeypatch.setattr(engine, "optimisation_step", step)


@pytest.mark.parametrize(
    "method, name",
    [("meanteacher", "demo_label6_semi_cutmix_reco_0"), ("unimatch", "demo_label6_unimatch_reco_0")],
)
def test_sigterm_mid_epoch_saves_the_step_and_resume_is_bit_identical(
    method, name, small_demo, tmp_path, monkeypatch, capsys
):
    common = [
        "--epochs",
        "1",
        "--iters_per_epoch",
        "3",
        "--apply_aug",
        "cutmix",
        "--apply_reco",
        "--method",
        method,
        "--num_queries",
        "256",
        "--output_dim",
        "128",
    ]  # ReCo's backward large enough to use every thread
    engine.main("semi", argv_for(small_demo, tmp_path / "a", *common))
    every_step(
        monkeypatch,
        lambda n, run: time.sleep(2) if n == 1 else n == 2 and os.kill(os.getpid(), signal.SIGTERM),
    )
    argv = argv_for(small_demo, tmp_path / "b", *common)
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        engine.main("semi", argv)
    assert stopped.value.code == faults.exit_code(signal.SIGTERM) == 143
    out = capsys.readouterr().out.splitlines()
    assert (
        out[-1].startswith("stopped by SIGTERM in epoch 1 after iteration 2/3; ")
        and "last.pth is saved" in out[-1]
    )
    assert out[-1].endswith(" ".join(argv) + " --resume") and "--resume --" not in out[-1]
    stopped_after = last(tmp_path / "b", name)
    assert stopped_after["epoch_state"]["iteration"] == 2 and stopped_after["wall_s"] > 2
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
    monkeypatch.undo()
    resumed_at = time.perf_counter()
    engine.main("semi", argv + ["--resume"])
    resumed_s = time.perf_counter() - resumed_at
    assert "resuming at epoch 1 after iteration 2" in capsys.readouterr().out
    assert_same_run(last(tmp_path / "a", name), last(tmp_path / "b", name))
    summary = json.loads((tmp_path / "b" / "log" / name / "summary.json").read_text())
    assert summary["wall_s"] >= stopped_after["wall_s"] + resumed_s - 0.1  # both invocations count


def test_nonfinite_losses_skip_the_update_and_stop_after_a_streak(small_demo, tmp_path, monkeypatch, capsys):
    states, poisoned = [], [False]

    def record(n, run):  # NaN images on step 1 (alone) and from step 3 on (a streak in epoch 2)
        states.append({k: v.clone() for k, v in run.model.state_dict().items()})
        poisoned[0] = n != 2

    def supervised_step(net, images, labels, settings, original=methods.supervised_step):
        return original(net, images * np.nan if poisoned[0] else images, labels, settings)

    monkeypatch.setattr(methods, "supervised_step", supervised_step)
    every_step(monkeypatch, record)
    with pytest.raises(SystemExit) as stopped:
        engine.main(
            "sup",
            argv_for(small_demo, tmp_path, "--epochs", "2", "--iters_per_epoch", "2", "--max_nonfinite", "2"),
        )
    captured = capsys.readouterr()
    assert stopped.value.code == 2
    assert "non-finite in 2 consecutive steps (epoch 2, iteration 2; --max_nonfinite 2)" in captured.err
    assert "last.pth keeps the last saved state" in captured.err and captured.err.count("\n") == 1
    epoch_lines = [line for line in captured.out.splitlines() if line.startswith("EPOCH")]
    assert len(epoch_lines) == 1 and "non-finite steps skipped: 1" in epoch_lines[0]
    # states[n] is the state before step n + 1: step 1 changed nothing (BN statistics included), step 2 did
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    assert all(torch.equal(states[2][k], states[3][k]) for k in states[2])
    saved = last(tmp_path, "demo_label6_sup_0")
    assert saved["epoch"] == 1 and "epoch_state" not in saved  # the end of epoch 1: the last good state
    assert np.isfinite(saved["metrics"][0].numpy()).all()


def test_a_full_disk_while_saving_the_checkpoint_stops_with_its_path(
    small_demo, tmp_path, monkeypatch, capsys
):
    real_save, saves = torch.save, []

    def save(obj, file, *a, **k):
        saves.append(obj)
        if isinstance(obj, dict) and "optimizer" in obj and obj["epoch"] == 2:
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as stopped:
        engine.main("sup", argv_for(small_demo, tmp_path, "--epochs", "2", "--iters_per_epoch", "1"))
    err = capsys.readouterr().err
    run_dir = tmp_path / "log" / "demo_label6_sup_0"
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert (
        err.startswith("error: [Errno 28] No space left on device while writing ")
        and str(run_dir / "last.pth") in err
    )
    assert last(tmp_path, "demo_label6_sup_0")["epoch"] == 1  # the previous checkpoint is intact
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_save_file_keeps_the_previous_file_and_names_the_path(tmp_path):
    target = tmp_path / "x.npy"
    helpers.save_file(lambda f: np.save(f, np.arange(3)), target)

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"No space left on device while writing {target}") as error:
        helpers.save_file(full, target)
    assert error.value.errno == errno.ENOSPC
    assert np.load(target).tolist() == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_resume_refuses_truncated_and_foreign_checkpoints_and_touches_nothing(small_demo, tmp_path, capsys):
    argv = argv_for(small_demo, tmp_path, "--epochs", "1", "--iters_per_epoch", "1")
    engine.main("sup", argv)
    run_dir = tmp_path / "log" / "demo_label6_sup_0"
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    good = (run_dir / "last.pth").read_bytes()
    state = torch.load(run_dir / "last.pth", weights_only=True)
    cases = {
        "truncated.pth": (good[: len(good) // 2], "truncated.pth cannot be read"),
        "lacking.pth": (
            {k: v for k, v in state.items() if k != "optimizer"},
            "lacks optimizer, so it is not",
        ),
        "foreign.pth": (state | {"model": {"weight": torch.zeros(3)}}, "foreign.pth does not fit this run"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            engine.main("sup", argv + ["--resume", str(path)])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.startswith("error: --resume: ") and message in err, err
        assert err.count("\n") == 1
    assert sorted(p for p in run_dir.rglob("*") if p.is_file()) == files
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == before[p] for p in files)


def test_a_resumed_epoch_skips_exactly_the_drawn_batches():
    full = EpochBatchSampler(10, 2, 5, seed=3, rank=1)
    full.set_epoch(4)
    rest = EpochBatchSampler(10, 2, 5, seed=3, rank=1)
    rest.set_epoch(4, start=2)
    assert list(rest) == list(full)[2:] and len(rest) == 3


def test_resume_command_replaces_any_resume_flag(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_semisup.py"])
    assert (
        faults.resume_command(["--seed", "1", "--resume", "x.pth", "--epochs", "2"], 1)
        == "python train_semisup.py --seed 1 --epochs 2 --resume"
    )
    assert (
        faults.resume_command(["--resume=auto", "--data_root", "my data"], 2)
        == "torchrun --nproc_per_node=2 train_semisup.py --data_root 'my data' --resume"
    )


KILLER = """\
import os, sys
import engine
step, count = engine.optimisation_step, [0]
def dying_step(run, *a, **k):  # rank 1 dies once, at the step given, as a lost node would
    count[0] += 1
    marker = sys.argv[1]
    if os.environ["RANK"] == "1" and count[0] == int(sys.argv[2]) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return step(run, *a, **k)
engine.optimisation_step = dying_step
engine.main("semi", sys.argv[3:])
"""


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_dies_and_ends_as_an_uninterrupted_run(small_demo, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    common = ["--epochs", "2", "--iters_per_epoch", "3", "--save_every", "2", "--resume", "auto"]
    outputs = []
    for out, die_at in (
        (tmp_path / "a", 0),
        (tmp_path / "b", 6),
    ):  # before step 6: epoch 2 was saved after iteration 2
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "--max-restarts=1",
                "--monitor-interval=0.2",
                str(probe),
                str(tmp_path / "died"),
                str(die_at),
                *argv_for(small_demo, out, *common),
            ],
            cwd=REPO,
            env=env,
            text=True,
            capture_output=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert (tmp_path / "died").exists() and "resuming at epoch 2 after iteration 2" in outputs[1]
    assert "resuming" not in outputs[0]  # --resume auto without a last.pth starts the run
    name = "demo_label6_semi_cutout_0"
    assert_same_run(last(tmp_path / "a", name), last(tmp_path / "b", name))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_with_last_pth_saved(small_demo, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train_semisup.py"),
            *argv_for(small_demo, tmp_path, "--epochs", "2", "--iters_per_epoch", "40"),
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines = []
    try:
        for line in agent.stdout:  # SIGTERM to the launcher (as a scheduler sends it) once epoch 2 has begun
            lines.append(line)
            if line.startswith("EPOCH    1"):
                agent.send_signal(signal.SIGTERM)
                break
        lines.append(agent.communicate(timeout=120)[0])
    finally:
        if agent.poll() is None:  # a failure leaves no launcher or rank behind
            os.killpg(agent.pid, signal.SIGKILL)
    out = "".join(lines)
    assert "stopped by SIGTERM in epoch 2 after iteration " in out, out
    assert "Continue with: torchrun --nproc_per_node=2 " in out and "--iters_per_epoch 40 --resume\n" in out
    assert agent.returncode != 0  # torchrun itself reports the signal (1), the ranks ended with 143
    position = last(tmp_path, "demo_label6_semi_cutout_0")["epoch_state"]["iteration"]
    assert 0 < position < 40


JOB_SIGNAL = """\
import os, signal, sys
import engine
evaluate, count = engine.evaluate, [0]
# SIGTERM to the whole job while the test loader's workers run, as Slurm sends it
def signalled_evaluate(*a, **k):
    count[0] += 1
    if count[0] == 2:
        os.killpg(os.getpgid(0), signal.SIGTERM)
    return evaluate(*a, **k)
engine.evaluate = signalled_evaluate
engine.main("semi", sys.argv[1:])
"""


def test_a_sigterm_to_the_whole_job_spares_the_loader_workers_and_the_run_stops_after_its_step(
    small_demo, tmp_path
):
    probe = tmp_path / "probe.py"
    probe.write_text(JOB_SIGNAL)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [
            sys.executable,
            str(probe),
            *argv_for(small_demo, tmp_path, "--epochs", "3", "--iters_per_epoch", "2", "--num_workers", "2"),
        ],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        start_new_session=True,
    )
    assert done.returncode == 143, done.stdout + done.stderr
    assert "stopped by SIGTERM in epoch 3 after iteration 1/2" in done.stdout
    assert last(tmp_path, "demo_label6_semi_cutout_0")["epoch_state"]["iteration"] == 1


KEPT_LOADER = """\
import sys
from build_data import SegmentationDataset, build_test_loader, build_train_loader
from layouts import resolve_dataset
data = resolve_dataset("demo", sys.argv[1])
train, test = (SegmentationDataset(data, data.list_ids(split), split) for split in ("train", "test"))
kept = [iter(build_train_loader(train, 2, 3, num_workers=2)), iter(build_test_loader(test, num_workers=2))]
next(kept[0]), next(kept[1])
kept.append(kept)  # a reference cycle: the loaders live until the interpreter ends
"""


def test_a_process_ends_while_a_cycle_still_holds_its_loaders(small_demo, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(KEPT_LOADER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, str(probe), str(small_demo)],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )  # workers ignore SIGTERM: without the exit hook, forever
    assert done.returncode == 0 and not done.stderr, done.stderr


@pytest.fixture
def default_sigint():
    """SIGINT at Python's default (KeyboardInterrupt) for one test, whatever the suite was started with (a
    shell's `pytest &` starts it ignoring SIGINT), and restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_stop_signals_are_caught_only_once_armed_and_a_second_one_stops_at_once(default_sigint):
    before = signal.getsignal(signal.SIGINT)
    with faults.StopSignals(repeat_after=0.5) as stop:
        assert signal.getsignal(signal.SIGINT) is before  # set-up keeps the default action
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        os.kill(
            os.getpid(), signal.SIGTERM
        )  # the same stop passed on twice (scheduler + torchrun): still one
        assert stop.received == signal.SIGINT
        time.sleep(0.5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_signal_the_process_was_started_ignoring_stays_ignored(default_sigint):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts `python train_sup.py ... &`
    with faults.StopSignals() as stop:
        stop.arm()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C meant for the foreground job
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop is still caught
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

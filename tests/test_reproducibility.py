"""Reproducible runs: the same command gives the same files at the default thread count however busy the CPU is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
# ReCo at sizes where torch's CPU kernels split their work over threads (a gathered [A, Q, D] of >= 32768
# elements): at the tiny sizes of the other tests every kernel runs on one thread and no order can vary.
SEMI = ["--dataset", "demo", "--batch_size", "2", "--crop_size", "33", "33", "--num_labels", "6", "--apply_aug",
        "classmix", "--apply_reco", "--num_queries", "256", "--output_dim", "128", "--num_negatives", "64",
        "--no_visual", "--device", "cpu"]
NAME = "demo_label6_semi_classmix_reco_0"


def default_threads() -> dict:
    """The environment of a child process with torch's default thread count (one per core)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    return env


def train(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(REPO / "train_semisup.py"), *SEMI, "--weights_dir", str(out / "w"),
                    "--log_dir", str(out / "log"), *extra], cwd=REPO, env=default_threads(), check=True,
                   capture_output=True, timeout=600)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved file, by its path of keys."""
    def walk(value, prefix):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{prefix}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(item, f"{prefix}/{i}")
    return dict(walk(torch.load(path, weights_only=True), ""))


def assert_same_files(a: Path, b: Path) -> None:
    """metrics.csv, last.pth (weights, teacher, optimiser, metrics) and the best weights, to the bit."""
    assert (a / "log" / NAME / "metrics.csv").read_bytes() == (b / "log" / NAME / "metrics.csv").read_bytes()
    for file in (Path("log") / NAME / "last.pth", Path("w") / f"{NAME}.pth"):
        first, second = tensors(a / file), tensors(b / file)
        assert first.keys() == second.keys()
        differ = [key for key in first if not torch.equal(first[key], second[key])]
        assert not differ, f"{file}: {len(differ)} tensors differ, first {differ[:3]}"


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: torch runs one thread, no order can vary")
def test_two_runs_give_the_same_files_while_a_busy_loop_loads_the_cpu(demo_root, tmp_path):
    common = ["--data_root", str(demo_root), "--epochs", "2", "--iters_per_epoch", "3"]
    train(tmp_path / "a", *common)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core taken from the second run
    try:
        train(tmp_path / "b", *common)
    finally:
        busy.kill()
        busy.wait()
    assert_same_files(tmp_path / "a", tmp_path / "b")

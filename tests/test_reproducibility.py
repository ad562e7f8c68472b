"""Reproducible runs (docs/reproducibility.md): the same command gives the same files at the default thread
count however busy the CPU is; --deterministic is accepted on the CPU and changes nothing there; config.json
says how the run was made; the network's deterministic formulations compute torch's values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distributed
import engine
import network.resize
from conftest import TINY_RUN, cli_args
from network import build_model

REPO = Path(__file__).resolve().parents[1]
# ReCo at sizes where torch's CPU kernels split their work over threads (a gathered [A, Q, D] of >= 32768
# elements): at the tiny sizes of the other tests every kernel runs on one thread and no order can vary.
SEMI = cli_args(
    **TINY_RUN,
    num_labels=6,
    apply_aug="classmix",
    apply_reco=True,
    num_queries=256,
    output_dim=128,
    num_negatives=64,
    no_visual=True,
    device="cpu",
)
NAME = "demo_label6_semi_classmix_reco_0"


def default_threads() -> dict:
    """The environment of a child process with torch's default thread count (one per core)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    return env


def train(out: Path, *extra: str) -> None:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "train_semisup.py"),
            *SEMI,
            "--weights_dir",
            str(out / "w"),
            "--log_dir",
            str(out / "log"),
            *extra,
        ],
        cwd=REPO,
        env=default_threads(),
        check=True,
        capture_output=True,
        timeout=600,
    )


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


@pytest.fixture
def deterministic_off():
    """Leave the process as a run without --deterministic leaves it."""
    yield
    distributed.use_deterministic(False)


def test_deterministic_on_the_cpu_changes_no_result_and_config_json_says_how_the_run_was_made(
    demo_root, tmp_path, deterministic_off
):
    common = [*SEMI, "--data_root", str(demo_root), "--epochs", "1", "--iters_per_epoch", "2"]
    for out, extra in ((tmp_path / "a", []), (tmp_path / "b", ["--deterministic"])):
        engine.main("semi", [*common, "--weights_dir", str(out / "w"), "--log_dir", str(out / "log"), *extra])
        config = json.loads((out / "log" / NAME / "config.json").read_text())
        assert config["threads"] == torch.get_num_threads()
        assert config["deterministic"] is bool(
            extra
        ) and torch.are_deterministic_algorithms_enabled() is bool(extra)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert_same_files(tmp_path / "a", tmp_path / "b")


def test_an_operation_without_a_deterministic_kernel_is_named_in_one_line():
    message = (
        "upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation."
    )
    code = f"import helpers\ndef main(argv):\n    raise RuntimeError({message!r})\nhelpers.run_cli(main)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --deterministic: upsample_bilinear2d_backward_out_cuda has no ")


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    "size_in, size_out", [((5, 7), (17, 9)), ((9, 9), (4, 6)), ((1, 1), (5, 3)), ((6, 4), (1, 1))]
)
def test_bilinear_as_matrix_products_computes_torchs_values_and_gradients(
    monkeypatch, align_corners, size_in, size_out
):
    x = torch.randn(2, 3, *size_in, requires_grad=True)
    grad = torch.randn(2, 3, *size_out)
    expected = F.interpolate(x, size=size_out, mode="bilinear", align_corners=align_corners)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    monkeypatch.setattr(network.resize, "exact_backward_needed", lambda t: True)  # the path CUDA takes
    got = network.resize.resize_bilinear(x, size_out, align_corners)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_the_model_with_deterministic_formulations_computes_the_same_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    model = build_model("deeplabv3p", 5, 16, resnet_depth=18)
    x = torch.randn(2, 3, 33, 33)

    def outputs_and_gradients():
        model.zero_grad()
        logits, rep = model(x)
        (network.upsample(logits, (33, 33)).square().mean() + rep.square().mean()).backward()
        return [logits, rep, *(p.grad.clone() for p in model.parameters() if p.grad is not None)]

    expected = outputs_and_gradients()
    monkeypatch.setattr(network.resize, "exact_backward_needed", lambda t: t.requires_grad)
    got = outputs_and_gradients()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

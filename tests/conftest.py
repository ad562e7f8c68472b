"""Shared fixtures."""

import functools
import importlib.util
from pathlib import Path

import pytest

import helpers
import preparation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (default sizes, seed 0), generated once per test session; treat as read-only."""
    return preparation.make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


@functools.cache
def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"dataset_script_{Path(name).stem}", REPO / "dataset" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_script(capsys):
    """run_script('make_splits.py', *args) -> (exit code, stdout, stderr): a dataset/ script's main through
    helpers.run_cli, in this process (no interpreter start-up per call)."""
    return lambda name, *args: run_entry(_load_script(name).main, args, capsys)


def run_entry(main, args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an entry point's main(argv) run through helpers.run_cli in this process."""
    capsys.readouterr()
    try:
        helpers.run_cli(main, [str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err

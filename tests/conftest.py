"""Shared fixtures."""

from pathlib import Path

import pytest

import build_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (default sizes, seed 0), generated once per test session; treat as read-only."""
    return build_data.make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)

"""The one training loop the four scripts share."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from build_data import DataError


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; user errors become one 'error: ...' line on stderr and exit code 2."""
    try:
        main(argv)
    except (DataError, FileNotFoundError, ValueError) as err:
        message = err.args[0] if len(err.args) == 1 else str(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def atomic_save(write: Callable[[Path], object], path: str | os.PathLike) -> None:
    """Write a file through `write(tmp_path)` beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model state_dict from a reference .pth, our best .pth, or our resume dict (its teacher if any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass the path of a .pth file "
                                "(training writes them to --weights_dir, default model_weights/)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                         "re-download or re-train it") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state.get("teacher") or state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}

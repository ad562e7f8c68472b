"""The flags that the training scripts, evaluate.py, predict.py and visual.py share, each defined once: a
command passes what differs (a default and the help that explains it)."""

from __future__ import annotations

import argparse

from helpers import AMP_DTYPES, UserError

# An ArgumentParser or one of its argument groups: both take add_argument.
Flags = argparse._ActionsContainer
DATA_ROOT_HELP = "dataset folder (default dataset/<name> in the repo)"
# build_data.loader_workers' rule for an unset --num_workers
WORKERS_RULE = "0 on CPU, up to 8 per process on CUDA"


def add_data_root_flag(parser: Flags, help: str = DATA_ROOT_HELP) -> None:
    """--data_root: the dataset's folder (None: the dataset's default)."""
    parser.add_argument("--data_root", default=None, help=help)


def add_device_flag(
    parser: Flags, default: str | None = None, default_help: str = "cuda if available"
) -> None:
    """--device, read by helpers.resolve_device; `default_help` says what the default picks."""
    parser.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default: {default_help})")


def add_amp_flag(parser: Flags) -> None:
    """--amp: a mode of helpers.AMP_DTYPES, off by default."""
    parser.add_argument(
        "--amp", default="off", choices=tuple(AMP_DTYPES), help="mixed precision (default: %(default)s)"
    )


def add_inference_flags(parser: Flags) -> None:
    """--window H W (checked by network.check_window) and --flip: the options of network.predict."""
    parser.add_argument(
        "--window",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="sliding-window inference with windows of H x W pixels (default: whole image)",
    )
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")


def add_loader_flags(
    parser: Flags,
    batch_help: str,
    batch_size: int | None = 4,
    num_workers: int | None = None,
    workers_help: str = "loader workers",
) -> None:
    """--batch_size (`batch_help`: what it counts, its default) and --num_workers (None: WORKERS_RULE)."""
    parser.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)
    default = WORKERS_RULE if num_workers is None else "%(default)s"
    parser.add_argument(
        "--num_workers", type=int, default=num_workers, help=f"{workers_help} (default: {default})"
    )


def check_loader_flags(batch_size: int, num_workers: int | None) -> None:
    """UserError naming the flag unless --batch_size is positive and --num_workers unset (None) or >= 0."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {num_workers}")

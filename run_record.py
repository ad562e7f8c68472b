"""What a run folder records about its run: the resolved configuration (helpers.RUN_CONFIG, at the start) and
the outcome (helpers.RUN_SUMMARY and the printed summary, at the end)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

from splits import split_digest

MODE_SCRIPTS = {"sup": "train_sup.py", "semi": "train_semisup.py", "sup_partial": "train_sup_partial.py",
                "semi_partial": "train_semisup_partial.py"}
PATH_FLAGS = ("data_root", "split_dir")  # recorded absolute, so a report can tell two data folders apart


def _json_value(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_config(args: argparse.Namespace, labelled: Sequence[str], unlabelled: Sequence[str],
               device: torch.device | str, world_size: int) -> dict:
    """config.json: every resolved flag, the split's digest, torch/torchvision versions, device, world size,
    mode and script, CPU threads and whether deterministic kernels were enforced (docs/reproducibility.md)."""
    flags = {name: _json_value(value) for name, value in sorted(vars(args).items())}
    for name in PATH_FLAGS:
        if flags.get(name) is not None:
            flags[name] = str(Path(flags[name]).resolve())
    return {"args": flags, "split_digest": split_digest(labelled, unlabelled), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "device": str(device), "world_size": world_size,
            "mode": args.train_mode, "script": MODE_SCRIPTS[args.train_mode], "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def summarise(metrics: np.ndarray, columns: Sequence[str], wall_s: float, weights: Path, npy: Path, run_dir: Path,
              figures: Sequence[Path]) -> dict:
    """summary.json from the finished metric array [epochs, columns] (epochs 1-based, paths absolute)."""
    miou = metrics[:, list(columns).index("test_miou")]
    best = len(miou) - 1 - int(np.argmax(miou[::-1]))  # the saved weights: the last epoch reaching the best
    return {"best_miou": float(miou[best]), "best_epoch": best + 1, "final_miou": float(miou[-1]),
            "final_epoch": len(miou), "epochs": len(miou), "wall_s": round(wall_s, 1),
            "weights": str(weights.resolve()), "npy": str(npy.resolve()), "run_dir": str(run_dir.resolve()),
            "figures": [str(f.resolve()) for f in figures]}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_summary(name: str, summary: dict) -> str:
    """The lines a finished run prints: best and final val mIoU, wall time, and where its files went."""
    folder = summary["run_dir"]
    files = ", ".join(sorted(p.name + "/" * p.is_dir() for p in Path(folder).iterdir() if not p.name.startswith(".")))
    return "\n".join([
        f"{name} finished in {_duration(summary['wall_s'])}: best val mIoU {summary['best_miou']:.4f} "
        f"(epoch {summary['best_epoch']}), final {summary['final_miou']:.4f} (epoch {summary['final_epoch']} "
        f"of {summary['epochs']})",
        f"  weights  {summary['weights']}  (epoch {summary['best_epoch']})",
        f"  log      {summary['npy']}",
        f"  run      {folder}/  ({files})",
        *[f"  figure   {f}" for f in summary["figures"]],
    ])

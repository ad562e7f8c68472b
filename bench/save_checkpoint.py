"""Cost of one last.pth save (engine.save_last: student, teacher, SGD momentum, fsynced atomically).

python bench/save_checkpoint.py [--depths 18 101] [--repeats 3] [--out DIR]
Prints JSON and a short table: the file size and the median seconds of one save per model.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import engine  # noqa: E402
from layouts import resolve_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[18, 101])
    p.add_argument("--dataset", default="pascal", help="sets the class count (pascal: 21)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="folder to write into (default: a temporary folder)")
    opts = p.parse_args()
    info = resolve_dataset(opts.dataset).info
    rows = []
    with tempfile.TemporaryDirectory(dir=opts.out) as folder:
        for depth in opts.depths:
            args = engine.resolve_args(
                engine.get_args_parser("semi").parse_args(
                    [
                        "--dataset",
                        opts.dataset,
                        "--resnet_depth",
                        str(depth),
                        "--pretrained",
                        "none",
                        "--apply_reco",
                        "--device",
                        "cpu",
                    ]
                )
            )
            run = engine.build_run(args, info, distributed.Dist(0, 1, torch.device("cpu")))
            for group in run.optimizer.param_groups:  # a trained run holds a momentum buffer per parameter
                for param in group["params"]:
                    run.optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
            path = Path(folder) / f"last{depth}.pth"
            metrics = np.zeros((args.epochs, 10))
            times = []
            for _ in range(opts.repeats):
                started = time.perf_counter()
                engine.save_last(run, path, 0, 0.0, metrics)
                times.append(time.perf_counter() - started)
            rows.append(
                {
                    "model": f"{args.backbone} ResNet-{depth}",
                    "size_mb": round(path.stat().st_size / 2**20, 1),
                    "save_s": round(statistics.median(times), 3),
                    "repeats": opts.repeats,
                }
            )
    print(json.dumps(rows))
    for row in rows:
        print(f"{row['model']:<22} {row['size_mb']:>8.1f} MB {row['save_s']:>8.3f} s")


if __name__ == "__main__":
    main()

"""Generate the synthetic demo dataset (Pascal layout, 7 classes of textured shapes under 16 nuisance
conditions recorded per image in conditions.json, partial labels for seeds 0-2; docs/demo.md), or the same
data as a dataset described by its folder (--layout folder: train with --dataset folder --data_root DIR).

    python dataset/demo_preprocess.py [--root dataset/demo] [--seed 0]
    python dataset/demo_preprocess.py --layout folder --root demo_folder
"""

import argparse
import sys
from pathlib import Path

# `python dataset/X.py` puts dataset/ on sys.path, not the repo root: add the root to import the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset_table  # noqa: E402
import helpers  # noqa: E402
import layouts  # noqa: E402
import preparation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=layouts.resolve_dataset("demo").root,
        help="output folder (default: dataset/demo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--num_train", type=int, default=240)
    parser.add_argument("--num_val", type=int, default=48)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument(
        "--layout",
        default="pascal",
        choices=("pascal", dataset_table.FOLDER),
        help="pascal (--dataset demo) or folder (--dataset folder --data_root ROOT)",
    )
    parser.add_argument(
        "--num_unlabelled",
        type=int,
        default=None,
        help="images without masks in ROOT/unlabelled/ (folder layout only; default 48)",
    )
    args = parser.parse_args(argv)
    folder = args.layout == dataset_table.FOLDER
    num_unlabelled = (48 if folder else 0) if args.num_unlabelled is None else args.num_unlabelled
    root = preparation.make_demo_dataset(
        args.root,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        layout=args.layout,
        num_unlabelled=num_unlabelled,
    )
    print(
        f"demo dataset written to {root} ({args.num_train} train, {args.num_val} val"
        f"{f', {num_unlabelled} unlabelled' if folder else ''} images, {args.layout} layout)"
    )


if __name__ == "__main__":
    helpers.run_cli(main)

"""Generate the synthetic demo dataset (Pascal layout, 5 classes, partial labels for seeds 0-2).

    python dataset/demo_preprocess.py [--root dataset/demo] [--seed 0]
"""

import argparse
import sys
from pathlib import Path

# `python dataset/X.py` puts dataset/ on sys.path, not the repo root: add the root to import the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import build_data  # noqa: E402
import helpers  # noqa: E402
import preparation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=build_data.dataset_info("demo").default_root,
                        help="output folder (default: dataset/demo)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--num_train", type=int, default=240)
    parser.add_argument("--num_val", type=int, default=48)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    args = parser.parse_args(argv)
    root = preparation.make_demo_dataset(args.root, seed=args.seed, num_train=args.num_train,
                                        num_val=args.num_val, size=args.size)
    print(f"demo dataset written to {root} ({args.num_train} train, {args.num_val} val images)")


if __name__ == "__main__":
    helpers.run_cli(main)

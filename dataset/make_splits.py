"""Write the labelled / unlabelled split that training computes for a label budget and seed.

    python dataset/make_splits.py --dataset pascal [--root DIR] --num_labels 60 --seed 0 --out DIR

DIR/labelled.txt lists the labelled ids in selection order, DIR/unlabelled.txt the other training ids
in list order, one id per line; pass DIR to a training script with --split_dir.
"""

import argparse
import sys
from pathlib import Path

# `python dataset/X.py` puts dataset/ on sys.path, not the repo root: add the root to import the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset_table  # noqa: E402
import helpers  # noqa: E402
import layouts  # noqa: E402
import splits  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", required=True, choices=[*sorted(dataset_table.DATASETS), dataset_table.FOLDER]
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="dataset folder (default: dataset/<name>; required for --dataset folder)",
    )
    parser.add_argument("--num_labels", type=int, required=True, help="number of labelled images (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the two lists into")
    args = parser.parse_args(argv)
    data = layouts.resolve_dataset(args.dataset, args.root)
    labelled, unlabelled = splits.get_split(data, args.num_labels, args.seed)
    splits.write_split_dir(args.out, labelled, unlabelled)
    print(f"{len(labelled)} labelled and {len(unlabelled)} unlabelled ids written to {args.out}")


if __name__ == "__main__":
    helpers.run_cli(main)

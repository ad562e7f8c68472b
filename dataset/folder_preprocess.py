"""Check a dataset described by its folder and write its partial labels: labels/train_{p0,p1,p5,p25}_{seed}/
beside labels/train/ (the generator of dataset/pascal_preprocess.py), for the partial-label scripts.

    python dataset/folder_preprocess.py --root DIR [--seeds 0 1 2]

Every check the training scripts make runs first (an image without a label, sizes, label values, the card).
Label files are visited in sorted name order; re-running replaces the folders.
"""

import argparse
import os
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
        required=True,
        help="the dataset folder (images/, labels/, classes.txt), as --data_root",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(preparation.PARTIAL_SEEDS))
    parser.add_argument(
        "--workers",
        type=int,
        default=min(3, os.cpu_count() or 1),
        help="processes (one seed each; the output does not depend on it)",
    )
    args = parser.parse_args(argv)
    data = layouts.resolve_dataset(dataset_table.FOLDER, args.root)
    ids = data.list_ids("train")
    data.list_ids("test")
    files = sorted(data.label_path(i, "train") for i in ids)
    [void] = dataset_table.void_values(data.info)
    print(f"{len(files)} labels in {files[0].parent}, {data.info.num_classes} classes; seeds {args.seeds}")
    preparation.write_partial_labels(
        files,
        args.root / "labels",
        preparation.FOLDER_PARTIAL_FORMAT,
        args.seeds,
        void_values=(void,),
        fill=void,
        progress=True,
        workers=args.workers,
    )
    print(
        f"wrote labels/train_{{p0,p1,p5,p25}}_{{{','.join(map(str, args.seeds))}}} in {args.root}; "
        "train with train_sup_partial.py / train_semisup_partial.py --dataset folder "
        f"--data_root {args.root} --partial p1"
    )


if __name__ == "__main__":
    helpers.run_cli(main)

"""Generate Pascal VOC partial labels beside SegmentationClassAug/:
SegmentationClassAug_{p0,p1,p5,p25}_{seed}/.

    python dataset/pascal_preprocess.py [--root dataset/pascal] [--seeds 0 1 2]

Images and full labels are left as they are. Label files are visited in sorted name order, so the output
is the reference's for the same seed when its file listing is sorted. Re-running replaces the folders.
"""

import argparse
import os
import sys
from pathlib import Path

# `python dataset/X.py` puts dataset/ on sys.path, not the repo root: add the root to import the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import build_data  # noqa: E402
import helpers  # noqa: E402
import layouts  # noqa: E402
import preparation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    data = layouts.resolve_dataset("pascal")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=data.root,
        help="folder holding SegmentationClassAug/ (default: dataset/pascal)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(preparation.PARTIAL_SEEDS))
    parser.add_argument(
        "--workers",
        type=int,
        default=min(3, os.cpu_count() or 1),
        help="processes (one seed each; the output does not depend on it)",
    )
    args = parser.parse_args(argv)
    labels = args.root / "SegmentationClassAug"
    files = sorted(labels.glob("*.png"))
    if not files:
        raise build_data.DataError(f"no label PNGs in {labels}: {data.info.setup_hint}")
    print(f"{len(files)} labels in {labels}; seeds {args.seeds}")
    preparation.write_partial_labels(
        files,
        args.root,
        "SegmentationClassAug_{partial}_{seed}",
        args.seeds,
        progress=True,
        workers=args.workers,
    )
    print(f"wrote SegmentationClassAug_{{p0,p1,p5,p25}}_{{{','.join(map(str, args.seeds))}}} in {args.root}")


if __name__ == "__main__":
    helpers.run_cli(main)

"""Flatten and resize Cityscapes to 1024x512, then generate its partial labels.

    python dataset/cityscapes_preprocess.py [--src dataset] [--root dataset/cityscapes] [--seeds 0 1 2]

Reads SRC/leftImg8bit_trainvaltest/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and the matching
SRC/gtFine_trainvaltest/gtFine/{train,val}/<city>/*_gtFine_labelIds.png; writes ROOT/images/{split}/{i}.png
(RGB, bicubic) and ROOT/labels/{split}/{i}.png (label ids, nearest), numbering cities in sorted order and
files sorted within a city, then ROOT/labels/train_{p0,p1,p5,p25}_{seed}/{i}.png (label ids; 0 = unlabelled).
ROOT/images/names_{train,val}.txt record the original name of every number (line i: city/city_seq_frame of
{i}.png), which maps the standard splits (dataset/splits/cityscapes, `--split cityscapes/1_30`) onto it.
The input is never changed; the output is written aside and renamed into place, so a re-run replaces it.
"""

import argparse
import os
import sys
from pathlib import Path

# `python dataset/X.py` puts dataset/ on sys.path, not the repo root: add the root to import the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

import build_data  # noqa: E402
import dataset_table  # noqa: E402
import helpers  # noqa: E402
import layouts  # noqa: E402
import preparation  # noqa: E402

SIZE = (1024, 512)  # (W, H)
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def void_label_ids() -> list[int]:
    """Label ids 0..33 that have no train id: never sampled for partial labels (as the reference)."""
    table = dataset_table.DATASETS["cityscapes"].label_table
    return [i for i in range(34) if table[i] == dataset_table.VOID]


def list_pairs(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) files of one split: cities sorted, files sorted within a city, paired by name."""
    pairs = []
    for city in sorted(p for p in image_dir.iterdir() if p.is_dir()):
        for image in sorted(city.glob(f"*{IMAGE_SUFFIX}")):
            label = label_dir / city.name / (image.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
            if not label.is_file():
                raise build_data.DataError(
                    f"label {label} for image {image} is missing: unpack "
                    f"gtFine_trainvaltest.zip completely next to leftImg8bit_trainvaltest"
                )
            pairs.append((image, label))
    if not pairs:
        raise build_data.DataError(f"no *{IMAGE_SUFFIX} images in the city folders of {image_dir}")
    return pairs


def main(argv: list[str] | None = None) -> None:
    default_root = layouts.resolve_dataset("cityscapes").root
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=default_root.parent,
        help="folder holding leftImg8bit_trainvaltest/ and gtFine_trainvaltest/ (default: dataset)",
    )
    parser.add_argument(
        "--root", type=Path, default=default_root, help="output (default: dataset/cityscapes)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=list(preparation.PARTIAL_SEEDS),
        help="partial-label seeds (none: skip partial labels)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for resizing")
    args = parser.parse_args(argv)
    image_root = args.src / "leftImg8bit_trainvaltest" / "leftImg8bit"
    label_root = args.src / "gtFine_trainvaltest" / "gtFine"
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise build_data.DataError(
                f"{folder} not found: unpack leftImg8bit_trainvaltest.zip and "
                f"gtFine_trainvaltest.zip into {args.src} (or pass --src)"
            )
    split_pairs = {split: list_pairs(image_root / split, label_root / split) for split in ("train", "val")}
    with helpers.staged_dir(args.root, "cityscapes") as tmp:
        images, labels = [], []
        for split, pairs in split_pairs.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i, (image, label) in enumerate(pairs):
                images.append((image, tmp / "images" / split / f"{i}.png"))
                labels.append((label, tmp / "labels" / split / f"{i}.png"))
            # Inside images/, so the record and the numbering it describes are replaced in one rename.
            names = "".join(f"{image.parent.name}/{image.name[: -len(IMAGE_SUFFIX)]}\n" for image, _ in pairs)
            layouts.name_record_path(tmp, split).write_text(names, encoding="utf-8")
            print(f"{split}: {len(pairs)} images")
        preparation.resize_files(images, SIZE, Image.BICUBIC, "RGB", args.workers, "images")
        preparation.resize_files(labels, SIZE, Image.NEAREST, None, args.workers, "labels")
        if args.seeds:
            train_labels = [tmp / "labels" / "train" / f"{i}.png" for i in range(len(split_pairs["train"]))]
            preparation.write_partial_labels(
                train_labels,
                tmp / "labels",
                "train_{partial}_{seed}",
                args.seeds,
                void_values=void_label_ids(),
                fill=0,
                progress=True,
                workers=args.workers,
            )
        for name in ("images", "labels"):
            helpers.replace_dir(tmp / name, args.root / name)
    print(f"Cityscapes written to {args.root}")


if __name__ == "__main__":
    helpers.run_cli(main)

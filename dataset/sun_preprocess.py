"""Build the SUN RGB-D tree the training scripts read: 9,860 train and 475 test images at 512x384.

    python dataset/sun_preprocess.py --src DIR [--root dataset/sun]

DIR holds the downloads as unpacked: SUNRGBD-train_images/img-k.jpg (k = 1..5285),
SUNRGBD-test_images/img-k.jpg (k = 1..5050) and sunrgbd_train_test_labels/img-k.png (1..5050 test, 5051..10335
train). Train image k becomes img-(k+5050); test images not listed in test_idx.txt join the train set; images
are resized with bicubic and labels with nearest. The input is never changed: a new tree is written aside and
renamed into place in ROOT, so a re-run gives the same result.
"""

import argparse
import os
import shutil
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

SIZE = (512, 384)  # (W, H)
NUM_TEST_ORIGINAL = 5050  # train image k pairs with label k + 5050
FOLDERS = ("SUNRGBD-train_images", "SUNRGBD-test_images", "sunrgbd_train_test_labels")


def indexed_files(folder: Path, suffix: str) -> dict[int, Path]:
    """{k: path} of folder/img-k<suffix> (k: the integer after the last '-')."""
    if not folder.is_dir():
        raise build_data.DataError(
            f"{folder} not found: --src must hold the unpacked SUN RGB-D folders {', '.join(FOLDERS)}"
        )
    files = {}
    for path in folder.glob(f"img-*{suffix}"):
        stem = path.stem.rsplit("-", 1)[-1]
        if stem.isdigit():
            files[int(stem)] = path
    if not files:
        raise build_data.DataError(f"no img-*{suffix} files in {folder}")
    return files


def main(argv: list[str] | None = None) -> None:
    default_root = layouts.resolve_dataset("sun").root
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", type=Path, required=True, help="folder with the original SUN RGB-D downloads"
    )
    parser.add_argument("--root", type=Path, default=default_root, help="output (default: dataset/sun)")
    parser.add_argument(
        "--test_idx",
        type=Path,
        default=None,
        help="test subset list (default: SRC/test_idx.txt, else the shipped dataset/sun/test_idx.txt)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for resizing")
    args = parser.parse_args(argv)
    for name in FOLDERS:
        if (args.root / name).resolve() == (args.src / name).resolve():
            raise build_data.DataError(
                f"--src and --root are the same folder ({args.src}): this script writes a "
                f"new tree and never changes its input; move the downloads elsewhere (e.g. "
                f"dataset/sun_raw) and pass that as --src"
            )
    test_idx = args.test_idx or next(
        (
            p
            for p in (args.src / "test_idx.txt", dataset_table.REPO_ROOT / "dataset" / "sun" / "test_idx.txt")
            if p.is_file()
        ),
        args.src / "test_idx.txt",
    )
    if not test_idx.is_file():
        raise FileNotFoundError(f"test list {test_idx} not found: pass --test_idx FILE")
    keep_test = {int(k) for k in test_idx.read_text(encoding="utf-8").split()}

    train = indexed_files(args.src / FOLDERS[0], ".jpg")
    test = indexed_files(args.src / FOLDERS[1], ".jpg")
    labels = indexed_files(args.src / FOLDERS[2], ".png")
    outputs = {}  # (folder, index) -> source image
    for k, path in train.items():
        outputs[(FOLDERS[0], k + NUM_TEST_ORIGINAL)] = path
    for k, path in test.items():
        folder = FOLDERS[1] if k in keep_test else FOLDERS[0]
        if (folder, k) in outputs:
            raise build_data.DataError(
                f"{path} collides with a renamed train image: is --src already "
                f"preprocessed? pass the original downloads"
            )
        outputs[(folder, k)] = path
    missing = sorted(k for _, k in outputs if k not in labels)
    if missing:
        raise build_data.DataError(
            f"no label img-{missing[0]:06d}.png in {args.src / FOLDERS[2]} (and "
            f"{len(missing) - 1} more): is --src the original, unprocessed download?"
        )

    with helpers.staged_dir(args.root, "sun") as tmp:
        for name in FOLDERS:
            (tmp / name).mkdir()
        images = [(src, tmp / folder / f"img-{k:06d}.jpg") for (folder, k), src in sorted(outputs.items())]
        label_jobs = [(src, tmp / FOLDERS[2] / f"img-{k:06d}.png") for k, src in sorted(labels.items())]
        num_train = sum(folder == FOLDERS[0] for folder, _ in outputs)
        print(f"{num_train} train and {len(outputs) - num_train} test images, {len(labels)} labels")
        preparation.resize_files(images, SIZE, Image.BICUBIC, "RGB", args.workers, "images")
        preparation.resize_files(label_jobs, SIZE, Image.NEAREST, None, args.workers, "labels")
        for name in FOLDERS:
            helpers.replace_dir(tmp / name, args.root / name)
    if not (args.root / "test_idx.txt").is_file():
        shutil.copyfile(test_idx, args.root / "test_idx.txt")
    print(f"SUN RGB-D written to {args.root}")


if __name__ == "__main__":
    helpers.run_cli(main)

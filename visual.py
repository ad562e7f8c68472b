"""Qualitative figure: ground truth next to the predictions of several checkpoints, saved to a PNG.

With no --checkpoints it draws the reference's figures from the published weights in --weights_dir:
Cityscapes val image 61 and Pascal val entry 961, Supervised | ClassMix | ClassMix + ReCo.

    python visual.py  # logging/visual_cityscapes.png, logging/visual_pascal.png
    python visual.py --dataset demo --checkpoints model_weights/demo_label20_semi_classmix_0.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

import cli_flags
import figures
from build_data import DataError
from helpers import UserError, run_cli
from layouts import resolve_dataset
from network import BACKBONES, RESNET_DEPTHS

# The reference's figure: the image it shows per dataset (an index into the val list) and the published files.
DEFAULT_INDEX = {"cityscapes": 61, "pascal": 961}
PUBLISHED = {
    "cityscapes": (
        "cityscapes_label20",
        {
            "sup": "https://www.dropbox.com/s/q6txvxnlhjzood0/cityscapes_label20_sup.pth?dl=0",
            "semi_classmix": "https://www.dropbox.com/s/eyrs1n9vifikfas/cityscapes_label20_semi_classmix.pth?dl=0",
            "semi_classmix_reco": "https://www.dropbox.com/s/aa1lcsrxujo9t4v/cityscapes_label20_semi_classmix_reco.pth?dl=0",
        },
    ),
    "pascal": (
        "pascal_label60",
        {
            "sup": "https://www.dropbox.com/s/lhmlvea3kmqrfc7/pascal_label60_sup.pth?dl=0",
            "semi_classmix": "https://www.dropbox.com/s/v6nlbmg9apboc0c/pascal_label60_semi_classmix.pth?dl=0",
            "semi_classmix_reco": "https://www.dropbox.com/s/xsxawpix5mtpi69/pascal_label60_semi_classmix_reco.pth?dl=0",
        },
    ),
}
PUBLISHED_TITLES = ("Supervised", "ClassMix", "ClassMix + ReCo")
PREPROCESSED_DATA = {  # the reference ReCo README's off-the-shelf preprocessed datasets
    "cityscapes": "https://www.dropbox.com/sh/1eeq4qi9g2n6la2/AAD4IK1oskNPUzfTuusMqfb7a?dl=0",
    "pascal": "https://www.dropbox.com/sh/gaoqumpylcci3he/AABjenlsGet060yhGXVxobE4a?dl=0",
}


def published_checkpoints(dataset: str, weights_dir: str | Path = "model_weights") -> list[Path]:
    """The three published files of the reference's figure for pascal or cityscapes."""
    if dataset not in PUBLISHED:
        raise UserError(
            f"there are no published checkpoints for --dataset {dataset}: pass --checkpoints "
            f"FILE [FILE ...] (e.g. the .pth files your training runs wrote to model_weights/)"
        )
    prefix, files = PUBLISHED[dataset]
    return [Path(weights_dir) / f"{prefix}_{kind}.pth" for kind in files]


def _check_checkpoints(dataset: str, checkpoints: Sequence[Path]) -> None:
    """A missing file is named with where to get it (a published one: the reference ReCo README's link)."""
    urls = {f"{PUBLISHED[d][0]}_{kind}.pth": url for d in PUBLISHED for kind, url in PUBLISHED[d][1].items()}
    for path in checkpoints:
        if path.is_file():
            continue
        if path.name in urls:
            raise FileNotFoundError(
                f"checkpoint {path} not found: download it from {urls[path.name]} into "
                f"{path.parent}/ (or pass --weights_dir DIR, or --checkpoints FILE ...)"
            )
        raise FileNotFoundError(
            f"checkpoint {path} not found: pass the path of a .pth file written by a training "
            f"script (they go to model_weights/ by default)"
        )


def draw_figure(
    dataset: str,
    checkpoints: Sequence[str | Path] | None = None,
    titles: Sequence[str] | None = None,
    index: int | None = None,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    weights_dir: str | Path = "model_weights",
    backbone: str | None = None,
    resnet_depth: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """figures.draw_comparison with the reference's defaults; returns the PNG's path.

    checkpoints default to the reference's published files (pascal, cityscapes); index defaults to the
    reference's image (cityscapes 61, pascal 961, else 0); out defaults to logging/visual_{dataset}.png.
    """
    if checkpoints:
        checkpoints = [Path(c) for c in checkpoints]
        titles = list(titles) if titles else [c.stem for c in checkpoints]
    else:
        checkpoints = published_checkpoints(dataset, weights_dir)
        titles = list(titles) if titles else list(PUBLISHED_TITLES)
    _check_checkpoints(dataset, checkpoints)
    index = DEFAULT_INDEX.get(dataset, 0) if index is None else index
    out = Path(out) if out else Path("logging") / f"visual_{dataset}.png"
    try:
        return figures.draw_comparison(
            resolve_dataset(dataset, data_root),
            checkpoints,
            titles,
            index,
            out,
            backbone,
            resnet_depth,
            device,
        )
    except DataError as error:  # missing or broken data: also name the reference ReCo README's download
        if dataset not in PREPROCESSED_DATA:
            raise
        raise DataError(f"{error}; the reference's preprocessed copy: {PREPROCESSED_DATA[dataset]}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ground truth next to checkpoint predictions, saved to a PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        nargs="+",
        default=["cityscapes", "pascal"],
        help="one figure per dataset (the reference draws cityscapes and pascal)",
    )
    p.add_argument(
        "--checkpoints",
        nargs="+",
        default=None,
        metavar="FILE",
        help="checkpoints to compare (default: the published ones in --weights_dir)",
    )
    p.add_argument("--titles", nargs="+", default=None, help="one panel title per checkpoint")
    p.add_argument(
        "--index",
        type=int,
        default=None,
        help="position in the test list (default: cityscapes 61, pascal 961, otherwise 0)",
    )
    cli_flags.add_data_root_flag(p)
    p.add_argument("--weights_dir", default="model_weights", help="where the published .pth files are")
    p.add_argument("--backbone", default=None, choices=BACKBONES, help="default: read from each checkpoint")
    p.add_argument(
        "--resnet_depth",
        type=int,
        default=None,
        choices=RESNET_DEPTHS,
        help="default: read from each checkpoint",
    )
    cli_flags.add_device_flag(p, default="cpu", default_help="%(default)s, as the reference")
    p.add_argument("--out", default="logging/visual_{dataset}.png", help="PNG path; {dataset} is filled in")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command-line entry: one PNG per --dataset."""
    args = get_args_parser().parse_args(argv)
    if len(args.dataset) > 1 and (args.checkpoints or args.index is not None or args.data_root):
        raise UserError(
            "--checkpoints, --index and --data_root apply to one dataset: pass a single --dataset"
        )
    if len(args.dataset) > 1 and "{dataset}" not in args.out:
        raise UserError(f"--out {args.out} would be overwritten by each dataset: put {{dataset}} in it")
    written = []
    for dataset in args.dataset:
        path = draw_figure(
            dataset,
            args.checkpoints,
            args.titles,
            args.index,
            args.data_root,
            args.out.replace("{dataset}", dataset),
            args.weights_dir,
            args.backbone,
            args.resnet_depth,
            args.device,
        )
        print(f"wrote {path}")
        written.append(path)
    return written


if __name__ == "__main__":
    run_cli(main)

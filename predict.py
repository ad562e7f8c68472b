"""Segment images no one has labelled: a palette PNG of class ids per image, at the image's own size.

    python predict.py --checkpoint model_weights/demo_label15_semi_classmix_reco_0.pth \
        --input photos/ --output masks/

Each image is padded (reflected, as evaluation pads) to the next size of 16k + 1 pixels, predicted, and cut
back to its own size: at 16k + 1 pixels (the reference's 321 and 513 are such sizes) every feature of the
network's coarsest stride (16) and the upsampled logits sit exactly on image pixels. Images whose padded sizes
are equal are predicted together, --batch_size at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli_flags
from build_data import IMAGE_SUFFIXES, DataError, loader_workers, read_image
from dataset_table import DATASETS, DatasetInfo
from figures import blend
from helpers import UserError, atomic_save, autocast_for, resolve_device, run_cli
from layouts import resolve_dataset
from network import check_window, infer_config, load_state_dict, model_from_state_dict, predict
from run_folder import CONFIG, LAST, checkpoint_dataset
from transforms import normalise, pad_to

STRIDE = 16  # the networks' coarsest feature stride (DeepLabv3+'s ASPP; DeepLabv2's 8 divides it)
OVERLAY_SUFFIX = "_overlay"
GLOB_CHARS = "*?["
LISTED_SKIPS = 20  # skipped files the final error line names (each is reported when it is met)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Predict a class-id mask for every input image: OUTPUT/<stem>.png, a palette PNG at the "
        "image's size (and OUTPUT/<stem>_overlay.png with --overlay)."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help=f"a .pth: our best weights (model_weights/), a run's {LAST}, or the reference's published file",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders (the images directly inside, sorted by name; not subfolders) and "
        "quoted glob patterns ('photos/**/*.jpg' recurses)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for the masks (created; existing files of the same name are replaced); it must not "
        "be, or be inside, a folder an input image comes from",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="the dataset the checkpoint was trained on (classes and palette); default: read from the "
        f"run's {CONFIG} beside the checkpoint or in logging/<checkpoint name>/",
    )
    cli_flags.add_data_root_flag(p, "that dataset's folder (needed by datasets described by their folder)")
    p.add_argument(
        "--overlay", action="store_true", help="also write <stem>_overlay.png, the mask over the photo"
    )
    cli_flags.add_inference_flags(p)
    cli_flags.add_amp_flag(p)
    cli_flags.add_loader_flags(
        p,
        "images per forward pass (of one padded size; default: %(default)s)",
        workers_help="image-decoding processes",
    )
    cli_flags.add_device_flag(p)
    return p


# ---------------------------------------------------------------------------------------------
# Inputs and outputs: checked before any work
# ---------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    """A file a folder or a glob contributes (a file named on the command line is always read)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_inputs(patterns: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(image files in the order given, each folder's and glob's sorted, no repeats; their folders)."""
    files, folders = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image_name(p))
            if not found:
                raise UserError(
                    f"--input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}; subfolders "
                    f"are not searched: pass a glob like '{path / '**' / '*.jpg'}' for those)"
                )
            folders.append(path)
        elif path.exists():
            found = [path]
        elif any(char in pattern for char in GLOB_CHARS):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if _is_image_name(Path(p)))
            if not found:
                raise UserError(
                    f"--input pattern {pattern!r} matches no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
        else:
            raise FileNotFoundError(
                f"--input {pattern} does not exist: pass image files, folders or quoted globs"
            )
        files += found
    seen, unique = set(), []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, folders + [p.parent for p in unique]


def output_names(stem: str, overlay: bool) -> list[str]:
    """The file names one input of that stem writes."""
    return [f"{stem}.png"] + ([f"{stem}{OVERLAY_SUFFIX}.png"] if overlay else [])


def check_outputs(images: Sequence[Path], folders: Sequence[Path], output: Path, overlay: bool) -> None:
    """UserError if --output is (inside) an input folder or two inputs would write the same output file."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file: pass a folder (it is created if missing)")
    out = output.resolve()
    for folder in folders:
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            raise UserError(
                f"--output {output} is {'inside ' if out != folder else ''}the input folder {folder}: "
                f"masks would mix with the images (and be read as inputs next time); choose an "
                f"--output folder outside the inputs"
            )
    writers: dict[str, Path] = {}
    for path in images:
        for name in output_names(path.stem, overlay):
            other = writers.setdefault(name.lower(), path)  # lower: case-insensitive file systems
            if other != path:
                raise UserError(
                    f"inputs {other} and {path} would both write {output / name}: rename one, or "
                    f"predict them into separate --output folders"
                )


def choose_dataset(dataset: str | None, root: str | None, checkpoint: Path, num_classes: int) -> DatasetInfo:
    """The dataset entry of --dataset/--data_root, else of the checkpoint's run configuration."""
    same = ", ".join(name for name, info in DATASETS.items() if info.num_classes == num_classes)
    hint = f" (it predicts {num_classes} classes{'; built-in datasets with as many: ' if same else ''}{same})"
    dataset, root, config = checkpoint_dataset(dataset, root, checkpoint, hint)
    if config:
        print(f"classes of --dataset {dataset}{f' --data_root {root}' if root else ''} (from {config})")
    return resolve_dataset(dataset, root).info


# ---------------------------------------------------------------------------------------------
# Reading images (in loader workers) and writing masks
# ---------------------------------------------------------------------------------------------


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The smallest size of 16k + 1 pixels per side that holds the image."""
    return tuple(STRIDE * -(-(side - 1) // STRIDE) + 1 for side in (height, width))


class Decoded(NamedTuple):
    """One input as a loader worker returns it; `error` says why it was skipped (tensors then None)."""

    index: int
    image: torch.Tensor | None  # normalised, padded [3, H', W']
    photo: np.ndarray | None  # uint8 [H, W, 3] (with --overlay only)
    error: str | None


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> Decoded: RGB, normalised as in training, padded to padded_size."""

    def __init__(self, paths: Sequence[Path], info: DatasetInfo, keep_photo: bool):
        # read_image's decoding errors end with the dataset's set-up hint: give them one that fits here
        self.paths, self.keep_photo = list(paths), keep_photo
        self.info = dataclasses.replace(info, setup_hint="or leave it out of --input")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        try:
            photo = read_image(self.info, self.paths[index])
        except DataError as error:
            return Decoded(index, None, None, str(error))
        image = torch.from_numpy(photo).permute(2, 0, 1).float().div_(255)
        padded, _ = pad_to(
            image[None], torch.zeros(1, *photo.shape[:2], dtype=torch.long), padded_size(*photo.shape[:2])
        )
        return Decoded(index, normalise(padded[0]), photo if self.keep_photo else None, None)


def _as_list(items: list[Decoded]) -> list[Decoded]:
    """Loader collate: keep the items apart (the skipped ones have no tensors to stack)."""
    return items


def read_sizes(paths: Sequence[Path]) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """({index: (H, W)} from each file's header, {index: why the file cannot be read})."""
    sizes, errors = {}, {}
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                sizes[index] = image.height, image.width
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            errors[index] = f"cannot read image {path} ({error}); replace it or leave it out of --input"
    return sizes, errors


def size_batches(sizes: dict[int, tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by padded size (in order of first appearance), at most batch_size a batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in sizes.items():
        groups.setdefault(padded_size(*size), []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def save_png(array: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    """uint8 [H, W] class ids (a palette PNG of `palette` [256, 3]) or [H, W, 3] RGB, written atomically."""
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette.tobytes())
    atomic_save(lambda tmp: image.save(tmp, format="PNG"), path)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def predict_images(args: argparse.Namespace) -> dict:
    """Predict every --input image into --output; returns {written, skipped: [(path, reason)], seconds}."""
    cli_flags.check_loader_flags(args.batch_size, args.num_workers)
    check_window(args.window)
    paths, folders = list_inputs(args.input)
    output = Path(args.output)
    check_outputs(paths, folders, output, args.overlay)
    device = resolve_device(args.device)
    checkpoint = Path(args.checkpoint)
    state = load_state_dict(checkpoint)
    info = choose_dataset(args.dataset, args.data_root, checkpoint, infer_config(state)["num_classes"])
    model = model_from_state_dict(state, f"checkpoint {checkpoint}", info.num_classes).to(device).eval()
    workers = loader_workers(args.num_workers, device)

    start = time.perf_counter()
    sizes, skipped = read_sizes(paths)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, info, args.overlay),
        batch_sampler=size_batches(sizes, args.batch_size),
        num_workers=workers,
        collate_fn=_as_list,
        pin_memory=device.type == "cuda",
    )
    autocast = autocast_for(device, args.amp)
    output.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=len(paths), unit="img", desc="predict", dynamic_ncols=True) as bar:
        for index, reason in skipped.items():
            bar.write(f"skipped {paths[index]}: {reason}", file=sys.stderr)
        bar.update(len(skipped))
        for batch in loader:
            readable = []
            for item in batch:
                if item.error is None:
                    readable.append(item)
                else:
                    skipped[item.index] = item.error
                    bar.write(f"skipped {paths[item.index]}: {item.error}", file=sys.stderr)
            if readable:
                images = torch.stack([item.image for item in readable]).to(device, non_blocking=True)
                with autocast():
                    logits = predict(
                        model,
                        images,
                        images.shape[-2:],
                        flip=args.flip,
                        window=tuple(args.window) if args.window else None,
                    )
                masks = logits.argmax(1).to(torch.uint8).cpu().numpy()
                for item, mask in zip(readable, masks):
                    height, width = sizes[item.index]
                    mask, stem = mask[:height, :width], paths[item.index].stem
                    save_png(mask, output / f"{stem}.png", info.palette)
                    if args.overlay:
                        save_png(
                            blend(item.photo, mask, info.palette), output / f"{stem}{OVERLAY_SUFFIX}.png"
                        )
                written += len(readable)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    print(
        f"wrote {written} mask{'s' * (written != 1)}{' and overlays' if args.overlay else ''} to {output} "
        f"in {seconds:.1f} s ({written / seconds:.2f} images/s)"
    )
    skipped_list = [(paths[i], skipped[i]) for i in sorted(skipped)]
    if skipped_list:
        names = ", ".join(str(path) for path, _ in skipped_list[:LISTED_SKIPS])
        if len(skipped_list) > LISTED_SKIPS:
            names += f" and {len(skipped_list) - LISTED_SKIPS} more"
        raise UserError(
            f"{len(skipped_list)} of {len(paths)} images could not be read and were skipped "
            f"(reasons above): {names}"
        )
    return {"written": written, "skipped": skipped_list, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parse argv and predict."""
    return predict_images(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

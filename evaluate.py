"""Evaluate any checkpoint (ours or the reference's) on a dataset's val/test split.

By default this is the reference's protocol: whole (padded) images, single scale, one confusion matrix over
the whole set. --window H W slides a window over each image and --flip adds the mirrored pass.

    python evaluate.py --dataset pascal --checkpoint model_weights/pascal_label60_semi_classmix_reco.pth
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import cli_flags
from build_data import SegmentationDataset, build_test_loader, loader_workers
from condition_groups import Conditions, format_groups, group_results, read_groups
from eval_loop import evaluate
from helpers import UserError, resolve_device, run_cli, write_json
from layouts import resolve_dataset
from network import BACKBONES, RESNET_DEPTHS, check_window, load_model
from run_folder import CONFIG, LAST, SPLIT, checkpoint_dataset, checkpoint_split
from splits import read_split_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint: per-class IoU, mIoU and pixel accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="pascal, cityscapes, sun, demo, or folder (your own data in --data_root); default: "
        f"read from the run's {CONFIG} beside the checkpoint or in "
        "logging/<checkpoint name>/",
    )
    cli_flags.add_data_root_flag(p)
    p.add_argument(
        "--checkpoint", required=True, help=f"a .pth state_dict (ours, the reference's, or our {LAST})"
    )
    p.add_argument("--backbone", default=None, choices=BACKBONES, help="default: read from the checkpoint")
    p.add_argument(
        "--resnet_depth",
        type=int,
        default=None,
        choices=RESNET_DEPTHS,
        help="default: read from the checkpoint",
    )
    p.add_argument("--output_dim", type=int, default=None, help="default: read from the checkpoint (256)")
    cli_flags.add_inference_flags(p)
    cli_flags.add_loader_flags(p, "test images per forward pass (default: %(default)s)")
    cli_flags.add_device_flag(p)
    cli_flags.add_amp_flag(p)
    p.add_argument(
        "--groups",
        default=None,
        metavar="FILE",
        help="also the mIoU by condition: a JSON file {image id: {factor: level}} such as the demo's "
        "conditions.json (docs/evaluation.md#by-condition)",
    )
    p.add_argument(
        "--split_dir",
        default=None,
        help="with --groups: the split trained on (its labelled.txt), to mark the levels the labelled "
        f"images show; default: the run's {SPLIT}/ beside its {CONFIG}",
    )
    p.add_argument(
        "--json", default=None, metavar="FILE", help="also write {miou, acc, iou_per_class[, groups]} here"
    )
    return p


def format_report(class_names: Sequence[str], result: dict) -> str:
    """Per-class IoU table, then mIoU and pixel accuracy (in %); classes in neither GT nor prediction: '-'."""
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name, iou in zip(class_names, result["iou_per_class"]):
        lines.append(f"{name:<{width}}  {'-' if math.isnan(iou) else f'{100 * iou:7.2f}':>7}")
    lines += [
        "-" * (width + 9),
        f"{'mIoU':<{width}}  {100 * result['miou']:7.2f}",
        f"{'accuracy':<{width}}  {100 * result['acc']:7.2f}",
    ]
    return "\n".join(lines)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Evaluate --checkpoint on --dataset's test split; prints, returns {miou, acc, iou_per_class}."""
    dataset, root, config = checkpoint_dataset(args.dataset, args.data_root, Path(args.checkpoint))
    if config:
        said = f"--dataset {dataset}" + (f" --data_root {root}" if root else "")
        print(f"{said} (from {config})", flush=True)
    data = resolve_dataset(dataset, root)
    info = data.info
    data.checked_root()
    cli_flags.check_loader_flags(args.batch_size, args.num_workers)
    check_window(args.window)
    device = resolve_device(args.device)
    ids = data.list_ids("test")
    groups = condition_records(args, ids)
    model = load_model(args.checkpoint, info.num_classes, args.backbone, args.resnet_depth, args.output_dim)
    model.to(device)
    loader = build_test_loader(
        SegmentationDataset(data, ids, "test"),
        batch_size=args.batch_size,
        num_workers=loader_workers(args.num_workers, device),
        pin_memory=device.type == "cuda",
    )
    protocol = "sliding window {}x{}".format(*args.window) if args.window else "whole padded image"
    print(
        f"{args.checkpoint} on {info.name} ({len(ids)} test images, {protocol}, single scale"
        f"{', + flip' if args.flip else ''}, device {device})",
        flush=True,
    )
    result = evaluate(
        model,
        loader,
        info.num_classes,
        device,
        amp=args.amp,
        flip=args.flip,
        window=tuple(args.window) if args.window else None,
        progress=True,
        per_image=groups is not None,
    )
    per_image_conf = result.get("per_image_confusion")
    result = {"miou": result["miou"], "acc": result["acc"], "iou_per_class": list(result["iou_per_class"])}
    print(format_report(info.class_names, result), flush=True)
    if groups is not None:
        conditions, source = groups
        result["groups"] = group_results(conditions, per_image_conf)
        print(format_groups(result["groups"], source), flush=True)
    if args.json:
        path = Path(args.json)
        # NaN (a class absent from GT and prediction) is not JSON: write null
        iou = [None if math.isnan(v) else v for v in result["iou_per_class"]]
        write_json(path, result | {"iou_per_class": iou}, indent=1)
        print(f"wrote {path}")
    return result


def condition_records(args: argparse.Namespace, ids: Sequence[str]) -> tuple[Conditions, str] | None:
    """--groups' conditions of the test images and of the labelled ones (--split_dir's, or the run's split/),
    with the line that says where they came from; None without --groups."""
    if not args.groups:
        if args.split_dir:
            raise UserError(
                "--split_dir only marks what the labelled images show in --groups' table: add --groups FILE"
            )
        return None
    split = Path(args.split_dir) if args.split_dir else checkpoint_split(Path(args.checkpoint))
    labelled = read_split_dir(split)[0] if split else None
    source = f"{args.groups}; " + (
        f"* = a level the labelled images in {split}/labelled.txt show"
        if split
        else "no split: pass --split_dir"
    )
    return read_groups(Path(args.groups), ids, labelled), source


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: parse argv and evaluate."""
    return evaluate_checkpoint(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)

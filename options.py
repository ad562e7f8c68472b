"""The flags of each training mode: the reference's names and defaults plus ours, their checks and resolution
against the dataset table."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import NamedTuple

import cli_flags
from acceleration import COMPILE_CHOICES, LAYOUT_CHOICES
from dataset_table import PARTIAL_SETTINGS, DatasetInfo, check_partial
from helpers import UserError
from layouts import resolve_dataset
from methods import CRITERIA
from module_list import MIX_MODES, ONLINE_METHODS, SEMI_METHODS
from network import BACKBONES, RESNET_DEPTHS
from run_folder import LAST, MODE_SCRIPTS, run_name
from splits import read_split_dir, shipped_split_dir
from transforms import HUE_JITTER


class Mode(NamedTuple):
    """What a training script trains."""

    semi: bool  # semi-supervised (a teacher and unlabelled batches) or supervised
    partial: bool  # partial labels (--partial) or a label budget (--num_labels)
    default_dataset: str  # the reference's default --dataset


MODES = {
    "sup": Mode(semi=False, partial=False, default_dataset="cityscapes"),
    "semi": Mode(semi=True, partial=False, default_dataset="cityscapes"),
    "sup_partial": Mode(semi=False, partial=True, default_dataset="cityscapes"),
    "semi_partial": Mode(semi=True, partial=True, default_dataset="pascal"),
}
# Flags whose values must match for --resume to continue a run.
RESUME_KEYS = (
    "dataset",
    "num_labels",
    "partial",
    "backbone",
    "resnet_depth",
    "output_dim",
    "apply_aug",
    "apply_reco",
    "seed",
    "batch_size",
    "crop_size",
    "hue_jitter",
    "epochs",
    "iters_per_epoch",
    "lr",
    "weight_decay",
    "num_queries",
    "num_negatives",
    "temp",
    "weak_threshold",
    "strong_threshold",
    "amp",
    "split_dir",
    "ema_buffers",
    "method",
    "reco_weight",
    "conf_thresh",
    "lr_multi",
    "criterion",
)
# The reference's weight decay (the mean teacher and the supervised scripts).
REFERENCE_WEIGHT_DECAY = 5e-4
# Flags of FixMatch and UniMatch only: unset otherwise.
ONLINE_FLAGS = ("conf_thresh", "lr_multi", "criterion")


def get_args_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of one training script: the reference's names and defaults, plus ours."""
    semi, partial = MODES[mode].semi, MODES[mode].partial
    p = argparse.ArgumentParser(
        description=f"ReCo training ({mode.replace('_', ', ')} labels)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ref = p.add_argument_group("reference flags")
    ref.add_argument("--gpu", type=int, default=0, help="CUDA device index (single-process runs)")
    ref.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: the dataset table's, 2.5e-3 as the reference but 0.01 for the demo; "
        "fixmatch/unimatch: the backbone's, from the table's values for them)",
    )
    ref.add_argument(
        "--weight_decay",
        type=float,
        default=None,
        help=f"default {REFERENCE_WEIGHT_DECAY} (fixmatch/unimatch: the dataset table's)",
    )
    ref.add_argument(
        "--dataset",
        default=MODES[mode].default_dataset,
        help="pascal, cityscapes, sun, demo, or folder (your own data in --data_root)",
    )
    ref.add_argument("--backbone", default="deeplabv3p", choices=BACKBONES)
    ref.add_argument(
        "--seed", type=int, default=0, help="fixes the labelled split (and the partial-label set)"
    )
    ref.add_argument("--output_dim", type=int, default=256, help="ReCo representation size")
    if partial:
        ref.add_argument("--partial", default="p0", choices=PARTIAL_SETTINGS)
    else:
        ref.add_argument(
            "--num_labels",
            type=int,
            default=None,
            help="labelled images; 0 = all (default: the dataset table's, 15 as the reference's, 5 for the "
            "demo)",
        )
    ref.add_argument(
        "--apply_aug",
        default="cutout",
        choices=MIX_MODES,
        help="unlabelled-batch mixing" + ("" if semi else " (unused here)"),
    )
    ref.add_argument("--weak_threshold", type=float, default=0.7, help="delta_w: pseudo-label mask for ReCo")
    ref.add_argument("--strong_threshold", type=float, default=0.97, help="delta_s: hard-query threshold")
    ref.add_argument("--apply_reco", action="store_true", help="add the ReCo loss")
    ref.add_argument("--num_negatives", type=int, default=512)
    ref.add_argument("--num_queries", type=int, default=256)
    ref.add_argument("--temp", type=float, default=0.5)
    ref.add_argument("--id", type=int, default=1, help="unused (kept for compatibility)")
    ref.add_argument("--mode", default=None, help="unused (kept for compatibility)")
    ref.add_argument("--port", type=int, default=None, help="unused (kept for compatibility)")

    methods = p.add_argument_group("method (docs/methods.md)")
    methods.add_argument(
        "--method",
        default=None,
        choices=SEMI_METHODS,
        help="the semi-supervised method (default meanteacher, the reference's)"
        if semi
        else "semi-supervised scripts only",
    )
    methods.add_argument("--reco_weight", type=float, default=1.0, help="the ReCo loss's weight in the total")
    methods.add_argument(
        "--conf_thresh",
        type=float,
        default=None,
        help="fixmatch/unimatch: tau, the pseudo-labels' confidence threshold",
    )
    methods.add_argument(
        "--lr_multi",
        type=float,
        default=None,
        help="fixmatch/unimatch: the head's learning rate is lr x this",
    )
    methods.add_argument(
        "--criterion",
        default=None,
        choices=CRITERIA,
        help="fixmatch/unimatch: the labelled loss, cross-entropy or OHEM",
    )

    new = p.add_argument_group("added flags (unset = the dataset table's value)")
    cli_flags.add_data_root_flag(new)
    cli_flags.add_loader_flags(
        new, "images per branch per process; supervised scripts use twice this", batch_size=None
    )
    new.add_argument("--crop_size", type=int, nargs=2, metavar=("H", "W"), default=None)
    new.add_argument(
        "--hue_jitter",
        type=float,
        default=None,
        help="the colour jitter's largest hue rotation, in turns, 0 to 0.5 (the table's: 0.25 as the "
        "reference and UniMatch, 0 for the demo, whose classes differ in colour); 0 keeps every hue",
    )
    new.add_argument("--epochs", type=int, default=None, help="epochs (the poly schedule's length)")
    new.add_argument("--iters_per_epoch", type=int, default=None)
    new.add_argument("--resnet_depth", type=int, default=None, choices=RESNET_DEPTHS)
    new.add_argument("--pretrained", default=None, help="imagenet, none, or a torchvision ResNet state_dict")
    cli_flags.add_amp_flag(new)
    cli_flags.add_device_flag(new, default_help="cuda:<gpu> if available")
    new.add_argument(
        "--compile",
        default="auto",
        choices=COMPILE_CHOICES,
        help="torch.compile the model's forward and backward ('reduce-overhead' adds CUDA graphs); "
        "auto: the fastest measured on the device (off on CPU and, until measured, on CUDA)",
    )
    new.add_argument(
        "--channels_last",
        default="auto",
        choices=LAYOUT_CHOICES,
        help="channels-last memory format for the convolutions (auto: on for CUDA, off on CPU)",
    )
    new.add_argument("--sync_bn", action="store_true", help="synchronised BatchNorm under torchrun")
    new.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU reruns repeat to the bit: deterministic kernels only (slower); CPU runs do without it",
    )
    new.add_argument("--ema_buffers", action="store_true", help="the teacher also averages BN buffers")
    new.add_argument("--split_dir", default=None, help="use labelled.txt/unlabelled.txt from this folder")
    new.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="a shipped standard split, e.g. pascal/92 or cityscapes/1_30 (dataset/splits/)",
    )
    new.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from the run folder's {LAST} (or the given file); 'auto': continue if "
        f"{LAST} exists, else start (one command line for the first launch and every "
        "restart)",
    )
    new.add_argument("--weights_dir", default="model_weights")
    new.add_argument("--log_dir", default="logging")
    new.add_argument("--log_interval", type=int, default=10, help="iterations between progress-bar updates")
    new.add_argument("--no_visual", action="store_true", help="skip the visual.py figure at the end")
    long_runs = p.add_argument_group("long runs (faults.py)")
    long_runs.add_argument(
        "--save_every",
        type=int,
        default=0,
        help=f"also write {LAST} every N iterations (0: at the end of each epoch only)",
    )
    long_runs.add_argument(
        "--max_nonfinite",
        type=int,
        default=10,
        help="stop after this many consecutive steps skipped for a non-finite loss (0: never)",
    )
    p.set_defaults(train_mode=mode)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the flags and fill unset ones from the dataset table; errors name the flag and the fix."""
    semi, partial = MODES[args.train_mode].semi, MODES[args.train_mode].partial
    info = resolve_dataset(args.dataset, args.data_root).info
    if args.split:
        if args.split_dir:
            raise UserError(
                f"--split {args.split} and --split_dir {args.split_dir} both name a split: keep one"
            )
        args.split_dir = str(shipped_split_dir(args.split, args.dataset))
    if partial:
        args.num_labels = 0
        check_partial(info, args.partial)
        if args.split_dir:
            raise UserError(
                "--split / --split_dir pick labelled images, but partial-label runs use every image; "
                "drop the flag or use train_sup.py / train_semisup.py"
            )
    else:
        args.partial = None
        if args.num_labels is None:
            args.num_labels = info.num_labels
        if args.split_dir:  # the split's size is the label budget, so the run name says what was used
            args.num_labels = len(read_split_dir(args.split_dir)[0])
    online = resolve_method(args, info)
    for flag, table_value in (
        ("batch_size", info.batch_size),
        ("epochs", info.epochs),
        ("iters_per_epoch", None if online else info.iters_per_epoch),
        ("resnet_depth", info.resnet_depth),
        ("pretrained", info.pretrained),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, table_value)
    args.crop_size = tuple(args.crop_size or info.crop_size)
    if args.hue_jitter is None:
        args.hue_jitter = HUE_JITTER if info.hue_jitter is None else info.hue_jitter
    if not 0 <= args.hue_jitter <= 0.5:
        raise UserError(
            f"--hue_jitter {args.hue_jitter}: a hue rotation in turns from 0 (none) to 0.5 (any hue); "
            "the reference's is 0.25"
        )
    cli_flags.check_loader_flags(args.batch_size, args.num_workers)
    positive = ["epochs", "log_interval"]
    positive += ["iters_per_epoch"] * (args.iters_per_epoch is not None)  # FixMatch, UniMatch: set later
    if args.apply_reco:
        positive += ["num_queries", "num_negatives", "output_dim"]
    for flag in positive:
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if semi and args.batch_size < 2:  # training-mode BatchNorm of the pooled ASPP branch needs two values
        raise UserError(
            f"--batch_size {args.batch_size}: the semi-supervised step needs at least 2 images per "
            "process (BatchNorm in training mode); use --batch_size 2 or more"
        )
    if min(args.crop_size) <= 0:
        raise UserError(f"--crop_size must be positive, got {args.crop_size}")
    if not partial and args.num_labels < 0:
        raise UserError(f"--num_labels must be 0 (all) or a positive count, got {args.num_labels}")
    if args.reco_weight < 0:
        raise UserError(f"--reco_weight must be >= 0, got {args.reco_weight}")
    if args.temp <= 0:
        raise UserError(f"--temp must be positive, got {args.temp}")
    for flag in ("save_every", "max_nonfinite"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (0 turns it off), got {getattr(args, flag)}")
    args.name = run_name(args, semi)
    return args


def resolve_method(args: argparse.Namespace, info: DatasetInfo) -> bool:
    """Check --method and its flags against the script and fill the method's defaults (FixMatch and UniMatch:
    the dataset table's OnlineDefaults); True for FixMatch and UniMatch."""
    semi, partial = MODES[args.train_mode].semi, MODES[args.train_mode].partial
    if not semi and args.method is not None:
        raise UserError(
            f"--method {args.method}: {MODE_SCRIPTS[args.train_mode]} trains on labels alone; "
            f"the semi-supervised methods run with train_semisup.py --method {args.method}"
        )
    if semi and args.method is None:
        args.method = "meanteacher"
    online = args.method in ONLINE_METHODS
    if online and partial:
        raise UserError(
            f"--method {args.method} with partial labels is not supported (its step takes "
            f"labelled and unlabelled images apart): use train_semisup.py --method {args.method} "
            "with --num_labels or --split, or the mean teacher here"
        )
    if not online:
        given = [flag for flag in ONLINE_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(
                f"--{given[0]} is a flag of FixMatch and UniMatch: add --method unimatch (or "
                "fixmatch) to train_semisup.py, or drop it"
            )
        args.lr = info.lr if args.lr is None else args.lr
        args.weight_decay = REFERENCE_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay
        return False
    table = info.online
    for flag in (f.name for f in fields(table)):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(table, flag))
    args.crop_size = tuple(args.crop_size)
    if args.crop_size[0] != args.crop_size[1]:
        raise UserError(
            f"--crop_size {args.crop_size[0]} {args.crop_size[1]}: --method {args.method} trains "
            f"on square crops, as UniMatch does; pass --crop_size S S"
        )
    if not 0 <= args.conf_thresh <= 1:
        raise UserError(f"--conf_thresh must be in [0, 1], got {args.conf_thresh}")
    if args.lr_multi <= 0:
        raise UserError(f"--lr_multi must be positive, got {args.lr_multi}")
    return True


def online_iterations(args: argparse.Namespace, unlabelled: int, world_size: int) -> None:
    """FixMatch's and UniMatch's epoch, one pass over the unlabelled images (ceil(U / processes) per process,
    in whole batches): fills --iters_per_epoch when unset. A UserError when a process gets less than a
    batch."""
    per_process = -(-unlabelled // world_size)
    if per_process < args.batch_size:
        processes = f" over {world_size} processes" if world_size > 1 else ""
        raise UserError(
            f"--method {args.method}: {unlabelled} unlabelled image(s){processes} make less than "
            f"one batch (--batch_size {args.batch_size}): lower --batch_size (at least 2) or "
            "--num_labels, or add unlabelled images"
        )
    if args.iters_per_epoch is None:
        args.iters_per_epoch = per_process // args.batch_size

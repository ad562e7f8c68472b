"""The flags of each training mode: the reference's names and defaults plus ours, their checks and resolution
against the dataset table, and the run's name and folder."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from acceleration import COMPILE_CHOICES, LAYOUT_CHOICES
from build_data import FOLDER, PARTIAL_SETTINGS, check_partial, dataset_info
from helpers import AMP_DTYPES, UserError
from module_list import MIX_MODES
from network import BACKBONES, RESNET_DEPTHS
from splits import read_split_dir, shipped_split_dir

MODES = {
    # name: (semi-supervised, partial labels, the reference's default --dataset)
    "sup": (False, False, "cityscapes"),
    "semi": (True, False, "cityscapes"),
    "sup_partial": (False, True, "cityscapes"),
    "semi_partial": (True, True, "pascal"),
}
# Flags whose values must match for --resume to continue a run.
RESUME_KEYS = ("dataset", "num_labels", "partial", "backbone", "resnet_depth", "output_dim", "apply_aug",
               "apply_reco", "seed", "batch_size", "crop_size", "epochs", "iters_per_epoch", "lr",
               "weight_decay", "num_queries", "num_negatives", "temp", "weak_threshold", "strong_threshold",
               "amp", "split_dir", "ema_buffers")


def get_args_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of one training script: the reference's names and defaults, plus ours."""
    semi, partial, default_dataset = MODES[mode]
    p = argparse.ArgumentParser(description=f"ReCo training ({mode.replace('_', ', ')} labels)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ref = p.add_argument_group("reference flags")
    ref.add_argument("--gpu", type=int, default=0, help="CUDA device index (single-process runs)")
    ref.add_argument("--lr", type=float, default=2.5e-3)
    ref.add_argument("--weight_decay", type=float, default=5e-4)
    ref.add_argument("--dataset", default=default_dataset,
                     help="pascal, cityscapes, sun, demo, or folder (your own data in --data_root)")
    ref.add_argument("--backbone", default="deeplabv3p", choices=BACKBONES)
    ref.add_argument("--seed", type=int, default=0, help="fixes the labelled split (and the partial-label set)")
    ref.add_argument("--output_dim", type=int, default=256, help="ReCo representation size")
    if partial:
        ref.add_argument("--partial", default="p0", choices=PARTIAL_SETTINGS)
    else:
        ref.add_argument("--num_labels", type=int, default=15, help="labelled images; 0 = all")
    ref.add_argument("--apply_aug", default="cutout", choices=MIX_MODES,
                     help="unlabelled-batch mixing" + ("" if semi else " (unused here)"))
    ref.add_argument("--weak_threshold", type=float, default=0.7, help="delta_w: pseudo-label mask for ReCo")
    ref.add_argument("--strong_threshold", type=float, default=0.97, help="delta_s: hard-query threshold")
    ref.add_argument("--apply_reco", action="store_true", help="add the ReCo loss")
    ref.add_argument("--num_negatives", type=int, default=512)
    ref.add_argument("--num_queries", type=int, default=256)
    ref.add_argument("--temp", type=float, default=0.5)
    ref.add_argument("--id", type=int, default=1, help="unused (kept for compatibility)")
    ref.add_argument("--mode", default=None, help="unused (kept for compatibility)")
    ref.add_argument("--port", type=int, default=None, help="unused (kept for compatibility)")

    new = p.add_argument_group("added flags (unset = the dataset table's value)")
    new.add_argument("--data_root", default=None, help="dataset folder (default dataset/<name> in the repo)")
    new.add_argument("--batch_size", type=int, default=None,
                     help="images per branch per process; supervised scripts use twice this")
    new.add_argument("--crop_size", type=int, nargs=2, metavar=("H", "W"), default=None)
    new.add_argument("--epochs", type=int, default=None, help="epochs (the poly schedule's length)")
    new.add_argument("--iters_per_epoch", type=int, default=None)
    new.add_argument("--num_workers", type=int, default=None, help="loader workers (default: 0 on CPU, up to 8 per process on CUDA)")
    new.add_argument("--resnet_depth", type=int, default=None, choices=RESNET_DEPTHS)
    new.add_argument("--pretrained", default=None, help="imagenet, none, or a torchvision ResNet state_dict")
    new.add_argument("--amp", default="off", choices=tuple(AMP_DTYPES), help="mixed precision")
    new.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:<gpu> if available)")
    new.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                     help="torch.compile the model's forward and backward ('reduce-overhead' adds CUDA graphs); "
                          "auto: the fastest measured on the device (off on CPU and, until measured, on CUDA)")
    new.add_argument("--channels_last", default="auto", choices=LAYOUT_CHOICES,
                     help="channels-last memory format for the convolutions (auto: on for CUDA, off on CPU)")
    new.add_argument("--sync_bn", action="store_true", help="synchronised BatchNorm under torchrun")
    new.add_argument("--deterministic", action="store_true",
                     help="GPU reruns repeat to the bit: deterministic kernels only (slower); CPU runs do without it")
    new.add_argument("--ema_buffers", action="store_true", help="the teacher also averages BN buffers")
    new.add_argument("--split_dir", default=None, help="use labelled.txt/unlabelled.txt from this folder")
    new.add_argument("--split", default=None, metavar="NAME",
                     help="a shipped standard split, e.g. pascal/92 or cityscapes/1_30 (dataset/splits/)")
    new.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                     help="continue from the run folder's last.pth (or the given file); 'auto': continue if "
                          "last.pth exists, else start (one command line for the first launch and every restart)")
    new.add_argument("--weights_dir", default="model_weights")
    new.add_argument("--log_dir", default="logging")
    new.add_argument("--log_interval", type=int, default=10, help="iterations between progress-bar updates")
    new.add_argument("--no_visual", action="store_true", help="skip the visual.py figure at the end")
    long_runs = p.add_argument_group("long runs (faults.py)")
    long_runs.add_argument("--save_every", type=int, default=0,
                           help="also write last.pth every N iterations (0: at the end of each epoch only)")
    long_runs.add_argument("--max_nonfinite", type=int, default=10,
                           help="stop after this many consecutive steps skipped for a non-finite loss (0: never)")
    p.set_defaults(train_mode=mode)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the flags and fill unset ones from the dataset table; errors name the flag and the fix."""
    semi, partial, _ = MODES[args.train_mode]
    info = dataset_info(args.dataset, args.data_root)
    if args.split:
        if args.split_dir:
            raise UserError(f"--split {args.split} and --split_dir {args.split_dir} both name a split: keep one")
        args.split_dir = str(shipped_split_dir(args.split, args.dataset))
    if partial:
        args.num_labels = 0
        check_partial(info, args.partial)
        if args.split_dir:
            raise UserError("--split / --split_dir pick labelled images, but partial-label runs use every image; "
                            "drop the flag or use train_sup.py / train_semisup.py")
    else:
        args.partial = None
        if args.split_dir:  # the split's size is the label budget, so the run name says what was used
            args.num_labels = len(read_split_dir(args.split_dir)[0])
    for flag, table_value in (("batch_size", info.batch_size), ("epochs", info.epochs),
                              ("iters_per_epoch", info.iters_per_epoch), ("resnet_depth", info.resnet_depth),
                              ("pretrained", info.pretrained)):
        if getattr(args, flag) is None:
            setattr(args, flag, table_value)
    args.crop_size = tuple(args.crop_size or info.crop_size)
    positive = ["batch_size", "epochs", "iters_per_epoch", "log_interval"]
    if args.apply_reco:
        positive += ["num_queries", "num_negatives", "output_dim"]
    for flag in positive:
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if semi and args.batch_size < 2:  # training-mode BatchNorm of the pooled ASPP branch needs two values
        raise UserError(f"--batch_size {args.batch_size}: the semi-supervised step needs at least 2 images per "
                        "process (BatchNorm in training mode); use --batch_size 2 or more")
    if min(args.crop_size) <= 0:
        raise UserError(f"--crop_size must be positive, got {args.crop_size}")
    if not partial and args.num_labels < 0:
        raise UserError(f"--num_labels must be 0 (all) or a positive count, got {args.num_labels}")
    if args.temp <= 0:
        raise UserError(f"--temp must be positive, got {args.temp}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    for flag in ("save_every", "max_nonfinite"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (0 turns it off), got {getattr(args, flag)}")
    args.name = run_name(args)
    return args


def dataset_tag(dataset: str, data_root: str | None) -> str:
    """The dataset in a run name: a built-in's name, or a folder dataset's folder name (in letters, digits, '.'
    and '-') and 6 hex digits of its absolute path: two folders, even of one name, never share a run folder."""
    if dataset != FOLDER:
        return dataset
    path = Path(data_root).resolve()
    name = re.sub(r"[^\w.-]+|_", "-", path.name).strip("-.") or "data"  # '_' separates the name's parts
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def run_name(args: argparse.Namespace) -> str:
    """The reference's file stem: {dataset}_label{N}|{partial}_{sup|semi_{aug}}[_reco]_{seed}, where a folder
    dataset's {dataset} is dataset_tag's."""
    semi = MODES[args.train_mode][0]
    dataset = dataset_tag(args.dataset, args.data_root)
    head = f"{dataset}_{args.partial}" if args.partial else f"{dataset}_label{args.num_labels}"
    kind = f"semi_{args.apply_aug}" if semi else "sup"
    return f"{head}_{kind}{'_reco' if args.apply_reco else ''}_{args.seed}"


def run_folder(args: argparse.Namespace) -> Path:
    """The run's folder of its own outputs (last.pth, CSV, TensorBoard, figures, split)."""
    return Path(args.log_dir) / args.name


def metric_columns(semi: bool) -> tuple[str, ...]:
    """Columns of the reference's per-epoch .npy metric array."""
    if semi:
        return ("sup_loss", "unsup_loss", "reco_loss", "labelled_miou", "labelled_acc", "unlabelled_miou",
                "unlabelled_acc", "test_loss", "test_miou", "test_acc")
    return ("train_loss", "train_miou", "train_acc", "test_loss", "test_miou", "test_acc")


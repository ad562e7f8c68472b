"""The one training loop the four scripts share."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from build_data import (PARTIAL_SETTINGS, DataError, DatasetInfo, SegmentationDataset, batch_transform, build_test_loader,
                        build_train_loader, dataset_info, get_split, list_ids, make_demo_dataset, read_split_dir,
                        write_split_dir)
from module_list import (EMA, MIX_MODES, ConfMatrix, PolyLR, compute_reco_loss, compute_supervised_loss,
                         compute_unsupervised_loss, generate_unsup_data, label_onehot)
from network import BACKBONES, RESNET_DEPTHS, build_model, predict, read_torch_file, upsample


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; user errors become one 'error: ...' line on stderr and exit code 2."""
    try:
        main(argv)
    except (DataError, FileNotFoundError, ValueError,  # an output path that is a file, or not writable:
            FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        message = str(err.args[0]) if len(err.args) == 1 else str(err)
        if "Original Traceback" in message:  # re-raised from a loader worker: keep the original's last line
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def atomic_save(write: Callable[[Path], object], path: str | os.PathLike) -> None:
    """Write a file through `write(tmp_path)` beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model state_dict from a reference .pth, our best .pth, or our resume dict (its teacher if any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass the path of a .pth file "
                                "(training writes them to --weights_dir, default model_weights/)")
    state = read_torch_file(path, "checkpoint", "re-download or re-train it")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state.get("teacher") or state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Command line: the reference's flags per script, plus ours
# ---------------------------------------------------------------------------------------------

MODES = {
    # name: (semi-supervised, partial labels, the reference's default --dataset)
    "sup": (False, False, "cityscapes"),
    "semi": (True, False, "cityscapes"),
    "sup_partial": (False, True, "cityscapes"),
    "semi_partial": (True, True, "pascal"),
}
# --amp: the autocast dtype of each mode (None: full precision)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    ref.add_argument("--dataset", default=default_dataset, help="pascal, cityscapes, sun or demo")
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
    new.add_argument("--sync_bn", action="store_true", help="synchronised BatchNorm under torchrun")
    new.add_argument("--ema_buffers", action="store_true", help="the teacher also averages BN buffers")
    new.add_argument("--split_dir", default=None, help="use labelled.txt/unlabelled.txt from this folder")
    new.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                     help="continue from the run folder's last.pth (or the given file)")
    new.add_argument("--weights_dir", default="model_weights")
    new.add_argument("--log_dir", default="logging")
    new.add_argument("--log_interval", type=int, default=10, help="iterations between progress-bar updates")
    new.add_argument("--no_visual", action="store_true", help="skip the visual.py figure at the end")
    p.set_defaults(train_mode=mode)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the flags and fill unset ones from the dataset table; errors name the flag and the fix."""
    semi, partial, _ = MODES[args.train_mode]
    info = dataset_info(args.dataset)
    if partial:
        args.num_labels = 0
        if not info.partial_labels:
            raise ValueError(f"--dataset {args.dataset} has no partial labels (the reference silently trains on "
                             "full labels here); use pascal or cityscapes, or a full-label script")
        if args.split_dir:
            raise ValueError("--split_dir picks labelled images, but partial-label runs use every image; "
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
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if min(args.crop_size) <= 0:
        raise ValueError(f"--crop_size must be positive, got {args.crop_size}")
    if not partial and args.num_labels < 0:
        raise ValueError(f"--num_labels must be 0 (all) or a positive count, got {args.num_labels}")
    if args.temp <= 0:
        raise ValueError(f"--temp must be positive, got {args.temp}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    args.name = run_name(args)
    return args


def run_name(args: argparse.Namespace) -> str:
    """The reference's file stem: {dataset}_label{N}|{partial}_{sup|semi_{aug}}[_reco]_{seed}."""
    semi = MODES[args.train_mode][0]
    head = f"{args.dataset}_{args.partial}" if args.partial else f"{args.dataset}_label{args.num_labels}"
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


# ---------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch.device (None: cuda if available, else cpu); ValueError naming the flag otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def init_distributed(args: argparse.Namespace) -> Dist:
    """Read torchrun's environment: NCCL on CUDA, gloo on CPU; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(args.device) if args.device else None
    want_cuda = chosen.type == "cuda" if chosen else torch.cuda.is_available()
    if world_size == 1:
        return Dist(0, 1, chosen or torch.device(f"cuda:{args.gpu}" if want_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN statistics, which each rank updates on its own batches)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_all(*keys: int) -> None:
    """Seed torch (all devices), numpy and random from a tuple of integers, e.g. (seed, epoch, rank)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Views(nn.Module):
    """Runs the model on each input separately (own BN statistics) inside one call, so DDP sees one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.model(x) for x in inputs]


def nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, H, W] labels or masks -> [B, h, w] by nearest neighbour (the reference's ReCo resolution)."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


# ---------------------------------------------------------------------------------------------
# One training step per mode (section 6 of the behaviour description)
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds; `student` is what the optimiser updates (DDP-wrapped if distributed)."""
    args: argparse.Namespace
    info: DatasetInfo
    dist: Dist
    model: nn.Module            # the plain student (its state_dict is the reference's format)
    student: nn.Module          # Views(model), DDP-wrapped under torchrun
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: PolyLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]


def reco_inputs(labels: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor, num_classes: int):
    """One-hot labels, validity mask and class probabilities at the logits' resolution for compute_reco_loss."""
    size = logits.shape[-2:]
    labels, masks = nearest(labels, size), nearest(masks, size)
    return (label_onehot(labels, num_classes), masks[:, None].float(),
            torch.softmax(logits.float(), dim=1))


def sup_step(run: Run, batch, monitors) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised step: CE on the (doubled) labelled batch, plus ReCo if asked. Returns (loss, logged losses)."""
    args, device = run.args, run.dist.device
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    with run.autocast():
        [(logits, rep)] = run.student(images)
    logits_up = upsample(logits, labels.shape[-2:])
    loss = compute_supervised_loss(logits_up, labels)
    if args.apply_reco:
        with torch.no_grad():
            onehot, mask, prob = reco_inputs(labels, labels >= 0, logits, run.info.num_classes)
        loss = loss + compute_reco_loss(rep, onehot, mask, prob, args.strong_threshold, args.temp,
                                        args.num_queries, args.num_negatives)
    monitors[0].update(logits_up.argmax(1), labels)
    return loss, loss.detach()[None]


def semi_step(run: Run, batch, monitors) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-teacher step: pseudo-labels, re-crop, mix, re-augment, sup + weighted unsup (+ ReCo)."""
    args, device, info = run.args, run.dist.device, run.info
    (images_l, labels_l), (images_u, labels_u) = ((t.to(device, non_blocking=True) for t in b) for b in batch)
    crop = images_u.shape[-2:]
    with torch.no_grad():
        with run.autocast():
            teacher_logits, _ = run.ema.model(images_u)
        conf_u, pseudo_u = torch.softmax(upsample(teacher_logits, crop), dim=1).max(dim=1)
        monitors[1].update(pseudo_u, labels_u)
        if args.partial:  # partial ground truth overrides the teacher, with full confidence
            known = labels_u >= 0
            pseudo_u = torch.where(known, labels_u, pseudo_u)
            conf_u = torch.where(known, torch.ones_like(conf_u), conf_u)
        images_u, pseudo_u, conf_u = batch_transform(images_u, pseudo_u, conf_u, crop, info.scale_range, False)
        images_u, pseudo_u, conf_u = generate_unsup_data(images_u, pseudo_u, conf_u, args.apply_aug)
        images_u, pseudo_u, conf_u = batch_transform(images_u, pseudo_u, conf_u, crop, (1.0, 1.0), True)

    with run.autocast():
        (logits_l, rep_l), (logits_u, rep_u) = run.student(images_l, images_u)
    logits_l_up = upsample(logits_l, labels_l.shape[-2:])
    sup = compute_supervised_loss(logits_l_up, labels_l)
    unsup = compute_unsupervised_loss(upsample(logits_u, crop), pseudo_u, conf_u, args.strong_threshold)
    reco = torch.zeros((), device=device)
    if args.apply_reco:
        with torch.no_grad():
            if args.partial:  # the student's confident predictions complete the sparse labels
                conf_l, pred_l = torch.softmax(logits_l_up, dim=1).max(dim=1)
                known = labels_l >= 0
                reco_labels_l = torch.where(known, labels_l, pred_l)
                reco_mask_l = known | (conf_l >= 0.97)  # the reference hard-codes 0.97 here
            else:
                reco_labels_l, reco_mask_l = labels_l, labels_l >= 0
            onehot, mask, prob = reco_inputs(torch.cat([reco_labels_l, pseudo_u]),
                                             torch.cat([reco_mask_l, conf_u >= args.weak_threshold]),
                                             torch.cat([logits_l, logits_u]), info.num_classes)
        reco = compute_reco_loss(torch.cat([rep_l, rep_u]), onehot, mask, prob, args.strong_threshold,
                                 args.temp, args.num_queries, args.num_negatives)
    monitors[0].update(logits_l_up.argmax(1), labels_l)
    loss = sup + unsup + reco
    return loss, torch.stack([sup, unsup, reco]).detach()


def optimisation_step(run: Run, batch: Sequence, monitors: Sequence[ConfMatrix]) -> torch.Tensor:
    """Loss, backward, SGD step and (semi) teacher update for one batch per loader; returns the logged losses."""
    if run.ema is None:
        loss, logged = sup_step(run, batch[0], monitors)
    else:
        loss, logged = semi_step(run, batch, monitors)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model)
    return logged


def train_one_epoch(run: Run, loaders: Sequence, epoch: int) -> list[float]:
    """One epoch of `iters_per_epoch` steps; returns the epoch's row of training metrics (reduced over ranks)."""
    args, device = run.args, run.dist.device
    semi = run.ema is not None
    seed_all(args.seed, epoch, run.dist.rank)  # every epoch's draws are fixed by (seed, epoch, rank): exact resume
    for loader in loaders:
        loader.set_epoch(epoch)
    monitors = [ConfMatrix(run.info.num_classes, device) for _ in range(2 if semi else 1)]
    losses = torch.zeros(3 if semi else 1, device=device)
    run.student.train()
    if semi:
        run.ema.model.train()  # the teacher's BN uses batch statistics for pseudo-labels, as the reference
    bar = tqdm(zip(*loaders), total=args.iters_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not (run.dist.main and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
    lr = run.optimizer.param_groups[0]["lr"]
    for it, batch in enumerate(bar):
        losses += optimisation_step(run, batch, monitors)
        if (it + 1) % args.log_interval == 0 and not bar.disable:  # the only host sync inside the epoch
            names = ("sup", "unsup", "reco") if semi else ("loss",)
            bar.set_postfix({n: f"{v:.3f}" for n, v in zip(names, (losses / (it + 1)).tolist())}, lr=f"{lr:.2e}")
    bar.close()
    losses = all_reduce_sum(losses) / (args.iters_per_epoch * run.dist.world_size)
    row = losses.tolist()
    for monitor in monitors:
        monitor.reduce_from_all_processes()
        row += list(monitor.get_metrics())
    return row


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, amp: str = "off",
             flip: bool = False, window: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Whole-set evaluation as the reference: one confusion matrix over every (padded) image, single scale."""
    model.eval()
    conf = ConfMatrix(num_classes, device)
    loss_sum = torch.zeros(2, device=device)  # (sum of batch losses, number of batches)
    with autocast_for(device, amp)():
        for images, labels in tqdm(loader, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = predict(model, images, labels.shape[-2:], flip=flip, window=window).float()
            valid = (labels >= 0).any()
            # batches with no valid pixel add no loss (the reference would add NaN)
            loss_sum += torch.stack([torch.where(valid, compute_supervised_loss(logits, labels).nan_to_num(), 0.0),
                                     valid.float()])
            conf.update(logits.argmax(1), labels)
    conf.reduce_from_all_processes()
    loss_sum = all_reduce_sum(loss_sum)
    miou, acc = conf.get_metrics()
    return {"loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(), "miou": miou, "acc": acc,
            "iou_per_class": conf.iou_per_class()}


def autocast_for(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for --amp off|bf16|fp16 on this device."""
    dtype = AMP_DTYPES[amp]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------
# Building a run, saving and resuming it
# ---------------------------------------------------------------------------------------------

def build_loaders(args: argparse.Namespace, info: DatasetInfo, d: Dist):
    """The split and the loaders: labelled (+ unlabelled for semi) train loaders and the test loader."""
    root = Path(args.data_root) if args.data_root else info.default_root
    if info.name == "demo" and not (root / "train_aug.txt").is_file():
        if d.main:
            print(f"generating the demo dataset in {root} ...", flush=True)
            make_demo_dataset(root)
        barrier()
    train_ids = list_ids(info, root, "train")  # a missing root is a DataError saying how to get the data
    if args.partial:
        labelled = unlabelled = train_ids
    elif args.split_dir:
        labelled, unlabelled = read_split_dir(args.split_dir)
    else:
        if args.num_labels > len(train_ids):
            raise ValueError(f"--num_labels {args.num_labels} is larger than the {len(train_ids)} training "
                             f"images of {info.name}; use at most {len(train_ids)} (0 = all)")
        labelled, unlabelled = get_split(info, root, args.num_labels, args.seed)
    semi = MODES[args.train_mode][0]
    # On CUDA, 8 workers feed a 10 + 10 semi step at 321^2 (bench/dataloader.py: 4 workers 107, 8 workers
    # 210 crops/s on a 16-core H100 machine, against about 110 needed); on a CPU they would steal its cores.
    workers = args.num_workers
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 1) // d.world_size)) if d.device.type == "cuda" else 0
    common = dict(num_workers=workers, rank=d.rank, world_size=d.world_size, pin_memory=d.device.type == "cuda")
    partial = dict(partial=args.partial, partial_seed=args.seed)
    batch = args.batch_size if semi else 2 * args.batch_size  # the reference doubles it without unlabelled data
    loaders = [build_train_loader(
        SegmentationDataset(info, root, labelled, "train", crop_size=args.crop_size, scale_range=info.scale_range,
                            augmentation=True, **partial),
        batch, args.iters_per_epoch, seed=args.seed, **common)]
    if semi:  # the unlabelled branch: plain crops at scale 1 (its labels only monitor, or are partial labels)
        loaders.append(build_train_loader(
            SegmentationDataset(info, root, unlabelled, "train", crop_size=args.crop_size, scale_range=(1.0, 1.0),
                                augmentation=False, **partial),
            batch, args.iters_per_epoch, seed=args.seed + 1_000_003, **common))
    test_loader = build_test_loader(SegmentationDataset(info, root, list_ids(info, root, "test"), "test"),
                                    batch_size=4, **common)
    return (labelled, unlabelled), loaders, test_loader


def build_run(args: argparse.Namespace, info: DatasetInfo, d: Dist) -> Run:
    """Model, teacher, optimiser (SGD Nesterov, one group), staircase poly schedule, AMP scaler, DDP wrapper."""
    torch.backends.cudnn.benchmark = True  # crops and eval sizes are fixed: let cuDNN pick the fastest kernels
    seed_all(args.seed)  # identical initial weights on every rank
    model = build_model(args.backbone, info.num_classes, args.output_dim, args.resnet_depth, args.pretrained)
    if args.sync_bn and d.world_size > 1:
        if d.device.type != "cuda":
            raise ValueError("--sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop the flag")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(d.device)
    ema = EMA(model, 0.99, average_buffers=args.ema_buffers) if MODES[args.train_mode][0] else None
    student = Views(model)
    if d.world_size > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=not args.apply_reco)  # the representation head is idle without ReCo
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    return Run(args=args, info=info, dist=d, model=model, student=student, ema=ema, optimizer=optimizer,
               scheduler=PolyLR(optimizer, args.epochs, power=0.9, min_lr=1e-6),
               scaler=torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16"),
               autocast=autocast_for(d.device, args.amp))


def resume_config(args: argparse.Namespace) -> dict:
    """The flags a resumed run must share with the run it continues (as plain, comparable values)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in RESUME_KEYS}


def save_last(run: Run, path: Path, epoch: int, best: float, metrics: np.ndarray) -> None:
    """The resume checkpoint: one dict with everything needed to continue after `epoch` (written atomically)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch + 1,
             "best_miou": best, "metrics": torch.from_numpy(metrics), "config": resume_config(run.args)}
    if run.ema is not None:
        state |= {"teacher": run.ema.model.state_dict(), "ema_step": run.ema.step}
    atomic_save(lambda tmp: torch.save(state, tmp), path)


def load_last(run: Run, path: Path) -> tuple[int, float, np.ndarray]:
    """Restore a run from its resume checkpoint; returns (next epoch, best mIoU, metric array)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist; "
                                "run without --resume to start, or pass the path of a last.pth")
    state = read_torch_file(path, "--resume:", "pass a last.pth written by this project, or run without --resume",
                        run.dist.device)
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"--resume: {path} is not a resume checkpoint (last.pth) of this project")
    ours = resume_config(run.args)
    differ = [k for k in ours if state["config"].get(k) != ours[k]]
    if differ:
        detail = ", ".join(f"--{k} {state['config'].get(k)} (now {ours[k]})" for k in differ)
        raise ValueError(f"--resume: {path} was written by another configuration: {detail}; "
                         "use the same flags or another --log_dir")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.model.load_state_dict(state["teacher"])
        run.ema.step = state["ema_step"]
    return state["epoch"], state["best_miou"], state["metrics"].cpu().numpy()


class Outputs:
    """Rank 0's files: best weights, the reference's .npy array, and a run folder (last.pth, CSV, TensorBoard,
    curves PNG, the split used)."""

    def __init__(self, args: argparse.Namespace, columns: Sequence[str], start_epoch: int):
        self.args, self.columns = args, tuple(columns)
        self.best_path = Path(args.weights_dir) / f"{args.name}.pth"
        self.npy_path = Path(args.log_dir) / f"{args.name}.npy"
        self.run_dir = run_folder(args)
        self.last_path = self.run_dir / "last.pth"
        for folder in (self.best_path.parent, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # rank 0 only, and only once outputs exist

        # epoch e is logged at step e + 1: a resumed run rewrites steps from start_epoch + 1 on
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_epoch + 1)

    def write_split(self, labelled: Sequence[str], unlabelled: Sequence[str]) -> None:
        write_split_dir(self.run_dir / "split", labelled, unlabelled)

    def write_epoch(self, epoch: int, lr: float, metrics: np.ndarray, model: nn.Module, is_best: bool) -> None:
        """Everything that changes after an epoch, each file replaced atomically."""
        if is_best:
            atomic_save(lambda tmp: torch.save(model.state_dict(), tmp), self.best_path)
        atomic_save(lambda tmp: np.save(open(tmp, "wb"), metrics), self.npy_path)
        rows = [",".join(("epoch",) + self.columns)]
        rows += [",".join([str(e + 1)] + [f"{v:.6g}" for v in metrics[e]]) for e in range(epoch + 1)]
        atomic_save(lambda tmp: tmp.write_text("\n".join(rows) + "\n"), self.run_dir / "metrics.csv")
        for name, value in zip(self.columns, metrics[epoch]):
            self.tb.add_scalar(name, value, epoch + 1)
        self.tb.add_scalar("lr", lr, epoch + 1)
        self.tb.flush()
        self.plot_curves(metrics[: epoch + 1])

    def plot_curves(self, metrics: np.ndarray) -> None:
        """Losses, mIoUs and accuracies per epoch in one PNG."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = np.arange(1, len(metrics) + 1)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, kind in zip(axes, ("loss", "miou", "acc")):
            for name, column in zip(self.columns, metrics.T):
                if name.endswith(kind):
                    ax.plot(epochs, column, marker=".", label=name)
            ax.set(xlabel="epoch", title=kind)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(self.args.name)
        fig.tight_layout()
        atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=100), self.run_dir / "curves.png")
        plt.close(fig)

    def close(self) -> None:
        self.tb.close()


def draw_run_figure(args: argparse.Namespace, out: Outputs) -> str:
    """visual.py's figure of the best weights on the first test image, saved as the run folder's visual.png."""
    import visual  # the figure tool sits beside the scripts and imports this module, so import it late

    return str(visual.draw_figure(args.dataset, [out.best_path], [args.name], index=0, data_root=args.data_root,
                                  out=out.run_dir / "visual.png", backbone=args.backbone,
                                  resnet_depth=args.resnet_depth, device="cpu"))


def train(args: argparse.Namespace) -> dict:
    """Train one run end to end; returns the best test mIoU and the output paths."""
    d = init_distributed(args)
    args = resolve_args(args)
    info = dataset_info(args.dataset)
    semi = MODES[args.train_mode][0]
    split, loaders, test_loader = build_loaders(args, info, d)
    run = build_run(args, info, d)
    columns = metric_columns(semi)
    metrics, start_epoch, best = np.zeros((args.epochs, len(columns))), 0, -1.0
    if args.resume:
        path = run_folder(args) / "last.pth" if args.resume == "auto" else Path(args.resume)
        start_epoch, best, metrics = load_last(run, path)
    out = Outputs(args, columns, start_epoch) if d.main else None
    if out:
        out.write_split(*split)
        print(f"{args.name}: {len(split[0])} labelled / {len(split[1])} unlabelled images, "
              f"{args.epochs} epochs x {args.iters_per_epoch} iterations, device {d.device}"
              f"{f' x {d.world_size} processes' if d.world_size > 1 else ''}"
              f"{f', resuming at epoch {start_epoch + 1}' if start_epoch else ''}", flush=True)
    eval_model = run.ema.model if semi else run.model
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        row = train_one_epoch(run, loaders, epoch)
        broadcast_buffers(eval_model)  # every rank evaluates the weights rank 0 saves (and resumes from)
        test = evaluate(eval_model, test_loader, info.num_classes, d.device, args.amp,
                        progress=d.main and sys.stderr.isatty())
        run.scheduler.step()
        metrics[epoch] = row + [test["loss"], test["miou"], test["acc"]]
        is_best = test["miou"] >= best
        best = max(best, test["miou"])
        if out:
            out.write_epoch(epoch, lr, metrics, eval_model, is_best)
            save_last(run, out.last_path, epoch, best, metrics)
            train_part = " | ".join(f"{n} {v:.4f}" for n, v in zip(columns[:-3], row))
            print(f"EPOCH {epoch + 1:4d} ITER {(epoch + 1) * args.iters_per_epoch:6d} | {train_part} || "
                  f"test loss {test['loss']:.4f} | mIoU {test['miou']:.4f} | acc {test['acc']:.4f} || "
                  f"best mIoU {best:.4f} | lr {lr:.2e} | {time.perf_counter() - started:.1f} s", flush=True)
    result = {"best_miou": best, "weights": None, "run_dir": None}
    if out:
        out.close()
        result |= {"weights": str(out.best_path), "run_dir": str(out.run_dir)}
        if not args.no_visual:
            result["figure"] = draw_run_figure(args, out)
    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def main(mode: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of the four training scripts."""
    run_cli(lambda a: train(get_args_parser(mode).parse_args(a)), argv)

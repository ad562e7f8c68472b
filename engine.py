"""The one training loop the four scripts share."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from acceleration import compile_in_place, compile_mode, memory_format, step_begin, warm_up
from build_data import (DatasetInfo, SegmentationDataset, build_test_loader, build_train_loader, dataset_info, list_ids,
                        list_unlabelled)
from distributed import (Dist, all_reduce_sum, barrier, broadcast_buffers, init_distributed, seed_all, shutdown,
                         use_deterministic)
from evaluation import evaluate
from faults import EpochState, StepGuard, StopSignals, exit_code, resume_command
from figures import covering_test_images, draw_figure, plot_curves
from helpers import (RUN_CONFIG, RUN_SUMMARY, UserError, atomic_save, autocast_for, read_torch_file, run_cli, save_file,
                     write_json)
from module_list import (EMA, ConfMatrix, PolyLR, compute_reco_loss, compute_supervised_loss,
                         compute_unsupervised_loss, generate_unsup_data, label_onehot)
from network import build_model, upsample
from options import MODES, RESUME_KEYS, get_args_parser, metric_columns, resolve_args, run_folder
from preparation import make_demo_dataset
from run_record import format_summary, run_config, summarise
from splits import get_split, load_split, write_split_dir
from transforms import batch_transform


class Views(nn.Module):
    """Runs the model on each input separately (own BN statistics) inside one call, so DDP sees one forward
    (and torch.compile one graph); inputs are put in the weights' memory format."""

    def __init__(self, model: nn.Module, layout: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, *inputs: torch.Tensor, with_rep: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [self.model(x.contiguous(memory_format=self.layout), with_rep) for x in inputs]


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
    autocast: Callable[[], AbstractContextManager]
    teacher: nn.Module | None = None  # Views(ema.model), compiled with the student; ema.model stays eager
    compile_mode: str = "off"         # the torch.compile mode in use ('off': eager)
    compile_s: float | None = None    # seconds spent compiling before the first step
    started: float = field(default_factory=time.perf_counter)  # when this invocation started
    wall_before: float = 0.0          # wall seconds of the invocations before a resume

    def wall_s(self) -> float:
        """Wall-clock seconds of the whole run so far, over every invocation of a resumed one."""
        return self.wall_before + time.perf_counter() - self.started


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
        [(logits, rep)] = run.student(images, with_rep=args.apply_reco)
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
            [(teacher_logits, _)] = run.teacher(images_u, with_rep=False)
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
        (logits_l, rep_l), (logits_u, rep_u) = run.student(images_l, images_u, with_rep=args.apply_reco)
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


def optimisation_step(run: Run, batch: Sequence, monitors: Sequence[ConfMatrix],
                      guard: StepGuard | None = None) -> tuple[torch.Tensor, bool, bool]:
    """Loss, backward, SGD step and (semi) teacher update for one batch per loader; returns (logged losses,
    skipped, stop). With a guard, a non-finite loss on any rank skips the update on every rank."""
    step_begin(run.compile_mode)
    if guard:
        guard.before_step()
    if run.ema is None:
        loss, logged = sup_step(run, batch[0], monitors)
    else:
        loss, logged = semi_step(run, batch, monitors)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    skip, stop = guard.decide(loss) if guard else (False, False)
    if not skip:
        run.scaler.step(run.optimizer)  # fp16: the scaler itself still skips a step whose gradients overflow
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)
    return logged, skip, stop


def build_guard(run: Run, monitors: Sequence[ConfMatrix], stop: StopSignals) -> StepGuard:
    """The step guard of a run: a skipped step restores what a forward pass changes besides the loss (the BN
    statistics of student and teacher, the monitors' counts)."""
    teacher = run.ema.model.buffers() if run.ema is not None else ()
    return StepGuard(stop, [*run.model.buffers(), *teacher, *(m.mat for m in monitors)])


def train_one_epoch(run: Run, loaders: Sequence, epoch: int, state: EpochState, stop: StopSignals,
                    checkpoint: Callable[[EpochState], None]) -> list[float] | None:
    """The steps of one epoch from state.iteration on; returns the epoch's row of training metrics (reduced
    over ranks), or None when a stop signal ended it early (after checkpoint(state) saved where it stopped)."""
    args = run.args
    semi = run.ema is not None
    for loader in loaders:
        loader.set_epoch(epoch, state.iteration)  # a resumed epoch skips the batches it has trained on
    guard = build_guard(run, state.monitors, stop)
    run.student.train()
    if semi:
        run.ema.model.train()  # the teacher's BN uses batch statistics for pseudo-labels, as the reference
    bar = tqdm(zip(*loaders), total=args.iters_per_epoch, initial=state.iteration,
               desc=f"epoch {epoch + 1}/{args.epochs}", disable=not (run.dist.main and sys.stderr.isatty()),
               leave=False, dynamic_ncols=True)
    lr = run.optimizer.param_groups[0]["lr"]
    for it, batch in enumerate(bar, state.iteration):
        seed_all("steps", args.seed, epoch, it, run.dist.rank)  # every step's draws are fixed: exact resume
        logged, skipped, stopping = optimisation_step(run, batch, state.monitors, guard)
        state.record(logged, skipped)
        if args.max_nonfinite and state.streak >= args.max_nonfinite:
            raise UserError(f"the loss was non-finite in {state.streak} consecutive steps (epoch {epoch + 1}, "
                            f"iteration {it + 1}; --max_nonfinite {args.max_nonfinite}); those steps were skipped "
                            f"and {run_folder(args) / 'last.pth'} keeps the last saved state: lower --lr, check "
                            "the data, or use --amp off")
        if stopping or (args.save_every and (it + 1) % args.save_every == 0 and it + 1 < args.iters_per_epoch):
            checkpoint(state)
        if stopping:
            bar.close()
            return None
        if (it + 1) % args.log_interval == 0 and not bar.disable:
            names = ("sup", "unsup", "reco") if semi else ("loss",)
            means = (state.losses / max(state.applied, 1)).tolist()
            bar.set_postfix({n: f"{v:.3f}" for n, v in zip(names, means)}, lr=f"{lr:.2e}",
                            **({"skipped": state.skipped} if state.skipped else {}))
    bar.close()
    losses = all_reduce_sum(state.losses.clone()) / (state.applied * run.dist.world_size)
    row = losses.tolist()
    for monitor in state.monitors:
        monitor.reduce_from_all_processes()
        # no pixel with a label (unlabelled images without masks): no score, rather than a misleading 0
        row += list(monitor.get_metrics()) if bool(monitor.mat.any()) else [math.nan, math.nan]
    return row


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
    if args.partial:
        labelled = unlabelled = list_ids(info, root, "train")  # a missing root: a DataError saying how to get it
    elif args.split_dir:
        labelled, unlabelled = load_split(info, root, args.split_dir)
    else:
        labelled, unlabelled = get_split(info, root, args.num_labels, args.seed)
    semi = MODES[args.train_mode][0]
    if semi:  # images with no masks at all (a folder dataset's unlabelled/) join the unlabelled pool
        unlabelled = [*unlabelled, *list_unlabelled(info, root)]
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
    # crops and eval sizes are fixed: let cuDNN pick the fastest kernels, unless runs must repeat to the bit
    torch.backends.cudnn.benchmark = not args.deterministic
    seed_all("init", args.seed)  # identical initial weights on every rank
    model = build_model(args.backbone, info.num_classes, args.output_dim, args.resnet_depth, args.pretrained)
    if args.sync_bn and d.world_size > 1:
        if d.device.type != "cuda":
            raise UserError("--sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop the flag")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(args.channels_last, d.device)
    model.to(d.device, memory_format=layout)
    model.representation.requires_grad_(args.apply_reco)  # not run without ReCo: no parameter is left unused
    semi = MODES[args.train_mode][0]
    ema = EMA(model, 0.99, average_buffers=args.ema_buffers) if semi else None
    student, teacher = Views(model, layout), Views(ema.model, layout) if ema else None
    mode, note = compile_mode(args.compile, d.device, d.world_size)
    if note and d.main:
        print(note, flush=True)
    for views in (student, teacher):
        if views is not None:
            compile_in_place(views, mode)  # before DDP wraps it, as torch.compile's documentation advises
    if d.world_size > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    autocast = autocast_for(d.device, args.amp)
    compile_s = None
    if mode != "off":  # compile before the first epoch, so its it/s are the compiled step's
        crop = (3, *args.crop_size)
        calls = ([(student, [(args.batch_size, *crop)] * 2, args.apply_reco, True),
                  (teacher, [(args.batch_size, *crop)], False, False)] if semi
                 else [(student, [(2 * args.batch_size, *crop)], args.apply_reco, True)])
        compile_s = warm_up(calls, d.device, autocast, mode)
        if d.main:
            print(f"torch.compile ({mode}): compiled in {compile_s:.1f} s", flush=True)
    return Run(args=args, info=info, dist=d, model=model, student=student, ema=ema, optimizer=optimizer,
               scheduler=PolyLR(optimizer, args.epochs, power=0.9, min_lr=1e-6),
               scaler=torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16"),
               autocast=autocast, teacher=teacher, compile_mode=mode, compile_s=compile_s)


def resume_config(args: argparse.Namespace) -> dict:
    """The flags a resumed run must share with the run it continues (as plain, comparable values)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in RESUME_KEYS}


def save_last(run: Run, path: Path, epoch: int, best: float, metrics: np.ndarray,
              inside: dict | None = None) -> None:
    """The resume checkpoint: one dict with everything needed to continue after `epoch`, or inside it at the
    position `inside` (an EpochState.state_dict()); written atomically."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
             "epoch": epoch + 1 if inside is None else epoch,
             "best_miou": best, "metrics": torch.from_numpy(metrics), "config": resume_config(run.args),
             "wall_s": run.wall_s()}
    if run.ema is not None:
        state |= {"teacher": run.ema.model.state_dict(), "ema_step": run.ema.step}
    if inside is not None:
        state["epoch_state"] = inside
    save_file(lambda file: torch.save(state, file), path)


def load_last(run: Run, path: Path) -> tuple[int, float, np.ndarray, dict | None]:
    """Restore a run from its resume checkpoint; returns (epoch to run, best mIoU, metric array, the state of
    that epoch's steps done so far or None to start it)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: nothing to resume, {path} does not exist; "
                                "run without --resume to start, or pass the path of a last.pth")
    state = read_torch_file(path, "--resume:", "pass a last.pth written by this project, or run without --resume",
                        run.dist.device)
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"--resume: {path} is not a resume checkpoint (last.pth) of this project")
    ours = resume_config(run.args)
    differ = [k for k in ours if state["config"].get(k) != ours[k]]
    if differ:
        detail = ", ".join(f"--{k} {state['config'].get(k)} (now {ours[k]})" for k in differ)
        raise UserError(f"--resume: {path} was written by another configuration: {detail}; "
                        "use the same flags or another --log_dir")
    needed = {"model", "optimizer", "scheduler", "scaler", "epoch", "best_miou", "metrics"}
    missing = sorted(needed - state.keys() | ({"teacher", "ema_step"} - state.keys() if run.ema else set()))
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}, so it is not a complete last.pth; "
                        "pass another file, or run without --resume")
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None:
            run.ema.model.load_state_dict(state["teacher"])
            run.ema.step = state["ema_step"]
        run.wall_before = float(state.get("wall_s", 0.0))  # absent from checkpoints of older versions
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--resume: {path} does not fit this run ({cause}); pass a last.pth written with the "
                        "same flags, or run without --resume") from None
    return state["epoch"], state["best_miou"], state["metrics"].cpu().numpy(), state.get("epoch_state")


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

    def write_config(self, labelled: Sequence[str], unlabelled: Sequence[str], d: Dist) -> None:
        """config.json: the resolved flags, split digest, versions, device and world size."""
        write_json(self.run_dir / RUN_CONFIG, run_config(self.args, labelled, unlabelled, d.device, d.world_size))

    def write_summary(self, metrics: np.ndarray, wall_s: float) -> dict:
        """summary.json of the finished run, also printed; returns it."""
        figures = [f for f in (self.run_dir / "curves.png", self.run_dir / "visual.png") if f.is_file()]
        summary = summarise(metrics, self.columns, wall_s, self.best_path, self.npy_path, self.run_dir, figures)
        write_json(self.run_dir / RUN_SUMMARY, summary)
        print(format_summary(self.args.name, summary), flush=True)
        return summary

    def write_epoch(self, epoch: int, lr: float, metrics: np.ndarray, model: nn.Module, is_best: bool) -> None:
        """Everything that changes after an epoch, each file replaced atomically."""
        if is_best:
            save_file(lambda file: torch.save(model.state_dict(), file), self.best_path)
        save_file(lambda file: np.save(file, metrics), self.npy_path)
        rows = [",".join(("epoch",) + self.columns)]
        rows += [",".join([str(e + 1)] + [f"{v:.6g}" for v in metrics[e]]) for e in range(epoch + 1)]
        atomic_save(lambda tmp: tmp.write_text("\n".join(rows) + "\n", encoding="utf-8"), self.run_dir / "metrics.csv")
        for name, value in zip(self.columns, metrics[epoch]):
            self.tb.add_scalar(name, value, epoch + 1)
        self.tb.add_scalar("lr", lr, epoch + 1)
        self.tb.flush()
        plot_curves(metrics[: epoch + 1], self.columns, self.args.name, self.run_dir / "curves.png")

    def close(self) -> None:
        self.tb.close()


def draw_run_figure(args: argparse.Namespace, out: Outputs) -> str:
    """visual.py's figure of the best weights on a few test images that cover the classes, as visual.png."""
    index = covering_test_images(args.dataset, args.data_root, count=4)
    return str(draw_figure(args.dataset, [out.best_path], [args.name], index=index, out=out.run_dir / "visual.png",
                           data_root=args.data_root, backbone=args.backbone, resnet_depth=args.resnet_depth,
                           device="cpu"))


def train(args: argparse.Namespace, argv: Sequence[str] | None = None, stop: StopSignals | None = None) -> dict:
    """Train one run end to end; returns the best test mIoU and the output paths.

    A signal that `stop` caught ends the run after the current step: last.pth is saved, a line gives the
    command that continues (from `argv`, default sys.argv[1:]), and SystemExit carries faults.exit_code."""
    started_at = time.perf_counter()
    stop = stop or StopSignals()  # never entered: a library call leaves the host process's signals alone
    use_deterministic(args.deterministic)  # before CUDA starts
    d = init_distributed(args)
    args = resolve_args(args)
    info = dataset_info(args.dataset, args.data_root)
    semi = MODES[args.train_mode][0]
    split, loaders, test_loader = build_loaders(args, info, d)
    run = build_run(args, info, d)
    run.started = started_at  # the wall time counts the set-up too
    columns = metric_columns(semi)
    metrics, start_epoch, best, resumed = np.zeros((args.epochs, len(columns))), 0, -1.0, None
    if args.resume:
        path = run_folder(args) / "last.pth" if args.resume in ("last", "auto") else Path(args.resume)
        if args.resume != "auto" or path.is_file():  # auto: a first launch starts, a restart continues
            start_epoch, best, metrics, resumed = load_last(run, path)
    out = Outputs(args, columns, start_epoch) if d.main else None
    if out:
        out.write_split(*split)
        out.write_config(*split, d)
        print(f"{args.name}: {len(split[0])} labelled / {len(split[1])} unlabelled images, "
              f"{args.epochs} epochs x {args.iters_per_epoch} iterations, device {d.device}"
              f"{f' x {d.world_size} processes' if d.world_size > 1 else ''}"
              f"{f', resuming at epoch {start_epoch + 1}' if start_epoch or resumed else ''}"
              f"{' after iteration %d' % resumed['iteration'] if resumed else ''}", flush=True)
    eval_model = run.ema.model if semi else run.model
    stop.arm()  # from here on a stop signal ends the run after a step, with last.pth saved
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        state = EpochState(3 if semi else 1, 2 if semi else 1, info.num_classes, d.device)
        if resumed and epoch == start_epoch:
            state.load_state_dict(resumed, d.rank, d.world_size)

        def checkpoint(inside: EpochState) -> None:
            position = inside.state_dict()  # every rank takes part: it gathers every rank's sums
            if out:
                save_last(run, out.last_path, epoch, best, metrics, position)

        row = train_one_epoch(run, loaders, epoch, state, stop, checkpoint)
        if row is None:  # stopped by a signal, and last.pth holds the step it stopped after
            shutdown()  # every rank waits for rank 0's save: torchrun ends all ranks when one exits
            if out:
                out.close()
                print(f"stopped by {signal.Signals(stop.received or signal.SIGTERM).name} in epoch {epoch + 1} "
                      f"after iteration {state.iteration}/{args.iters_per_epoch}; {out.last_path} is saved. "
                      f"Continue with: {resume_command(sys.argv[1:] if argv is None else argv, d.world_size)}",
                      flush=True)
            raise SystemExit(exit_code(stop.received or signal.SIGTERM))
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
            train_part = " | ".join(f"{n} {v:.4f}" if not math.isnan(v) else f"{n} n/a"
                                    for n, v in zip(columns[:-3], row))
            print(f"EPOCH {epoch + 1:4d} ITER {(epoch + 1) * args.iters_per_epoch:6d} | {train_part} || "
                  f"test loss {test['loss']:.4f} | mIoU {test['miou']:.4f} | acc {test['acc']:.4f} || "
                  f"best mIoU {best:.4f} | lr {lr:.2e} | {time.perf_counter() - started:.1f} s"
                  f"{f' | non-finite steps skipped: {state.skipped}' if state.skipped else ''}", flush=True)
    result = {"best_miou": best, "weights": None, "run_dir": None}
    if out:
        out.close()
        result |= {"weights": str(out.best_path), "run_dir": str(out.run_dir)}
        if not args.no_visual:
            result["figure"] = draw_run_figure(args, out)
        result["summary"] = out.write_summary(metrics, run.wall_s())
    shutdown()
    return result


def main(mode: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of the four training scripts."""
    with StopSignals() as stop:
        run_cli(lambda a: train(get_args_parser(mode).parse_args(a), a, stop), argv)

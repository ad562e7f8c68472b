"""The one training loop the four scripts share."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from acceleration import compile_in_place, compile_mode, memory_format, step_begin, warm_up
from build_data import (
    DatasetFiles,
    SegmentationDataset,
    build_test_loader,
    build_train_loader,
    loader_workers,
)
from dataset_table import DatasetInfo
from distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    seed_all,
    shutdown,
    use_deterministic,
)
from eval_loop import evaluate
from faults import EpochState, StepGuard, StopSignals, exit_code, resume_command
from figures import covering_test_images, draw_comparison, plot_curves
from helpers import UserError, autocast_for, read_torch_file, run_cli, save_file
from layouts import resolve_dataset
from methods import (
    TERMS,
    MethodSettings,
    PerturbedNet,
    Views,
    method_optimizer,
    ohem_min_kept,
    poly_lr,
    set_lr,
    training_step,
)
from module_list import EMA, ONLINE_METHODS, ConfMatrix, PolyLR
from network import build_model
from options import MODES, RESUME_KEYS, get_args_parser, online_iterations, resolve_args
from preparation import demo_to_generate, make_demo_dataset
from run_folder import LAST, UNRECORDED, RunFiles, RunWriter, labelled_batch, metric_columns
from splits import get_split, load_split

# ---------------------------------------------------------------------------------------------
# One optimisation step (the steps themselves are methods.py's), one epoch
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a training run holds; `student` is what the optimiser updates (DDP-wrapped if needed)."""

    args: argparse.Namespace
    info: DatasetInfo
    dist: Dist
    method: str  # the step: a key of methods.TERMS ('sup' for the supervised scripts)
    settings: MethodSettings  # what the step needs besides networks and batch
    model: nn.Module  # the plain student (its state_dict is the reference's format)
    student: nn.Module  # Views(model) (FixMatch, UniMatch: PerturbedNet(model)), DDP under torchrun
    ema: EMA | None  # the mean teacher's
    optimizer: torch.optim.Optimizer
    scheduler: PolyLR | None  # the reference's per-epoch schedule (None: methods.poly_lr per iteration)
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    teacher: nn.Module | None = None  # Views(ema.model), compiled with the student; ema.model stays eager
    compile_mode: str = "off"  # the torch.compile mode in use ('off': eager)
    compile_s: float | None = None  # seconds spent compiling before the first step
    started: float = field(default_factory=time.perf_counter)  # when this invocation started
    wall_before: float = 0.0  # wall seconds of the invocations before a resume

    def wall_s(self) -> float:
        """Wall-clock seconds of the whole run so far, over every invocation of a resumed one."""
        return self.wall_before + time.perf_counter() - self.started


def optimisation_step(
    run: Run, batch: Sequence, monitors: Sequence[ConfMatrix], guard: StepGuard | None = None
) -> tuple[torch.Tensor, bool, bool]:
    """Loss, backward, SGD step and (semi) teacher update for one batch per loader; returns (logged losses,
    skipped, stop). With a guard, a non-finite loss on any rank skips the update on every rank."""
    step_begin(run.compile_mode)
    if guard:
        guard.before_step()
    on_device = [[t.to(run.dist.device, non_blocking=True) for t in part] for part in batch]
    out, truths = training_step(run.method, run.student, run.teacher, on_device, run.settings)
    for monitor, predicted, truth in zip(monitors, (out.pred_x, out.pseudo), truths):
        monitor.update(predicted, truth)
    loss = out.loss
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    skip, stop = guard.decide(loss) if guard else (False, False)
    if not skip:
        run.scaler.step(run.optimizer)  # fp16: the scaler itself still skips a step whose gradients overflow
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)
    return out.terms, skip, stop


def build_guard(run: Run, monitors: Sequence[ConfMatrix], stop: StopSignals) -> StepGuard:
    """The step guard of a run: a skipped step restores what a forward pass changes besides the loss (the BN
    statistics of student and teacher, the monitors' counts)."""
    teacher = run.ema.model.buffers() if run.ema is not None else ()
    return StepGuard(stop, [*run.model.buffers(), *teacher, *(m.mat for m in monitors)])


def train_one_epoch(
    run: Run,
    loaders: Sequence,
    epoch: int,
    state: EpochState,
    stop: StopSignals,
    checkpoint: Callable[[EpochState], None],
) -> list[float] | None:
    """The steps of one epoch from state.iteration on; returns the epoch's row of training metrics
    (reduced over ranks), or None when a stop signal ended it early (checkpoint(state) has then saved
    where it stopped)."""
    args = run.args
    for loader in loaders:
        loader.set_epoch(epoch, state.iteration)  # a resumed epoch skips the batches it has trained on
    guard = build_guard(run, state.monitors, stop)
    run.student.train()
    if run.ema is not None:
        run.ema.model.train()  # the teacher's BN uses batch statistics for pseudo-labels, as the reference
    bar = tqdm(
        zip(*loaders),
        total=args.iters_per_epoch,
        initial=state.iteration,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=not (run.dist.main and sys.stderr.isatty()),
        leave=False,
        dynamic_ncols=True,
    )
    for it, batch in enumerate(bar, state.iteration):
        seed_all("steps", args.seed, epoch, it, run.dist.rank)  # every step's draws are fixed: exact resume
        if run.scheduler is None:  # a pure function of the step: nothing to save or restore
            set_lr(
                run.optimizer,
                poly_lr(args.lr, epoch * args.iters_per_epoch + it, args.epochs * args.iters_per_epoch),
                args.lr_multi,
            )
        logged, skipped, stopping = optimisation_step(run, batch, state.monitors, guard)
        state.record(logged, skipped)
        if args.max_nonfinite and state.streak >= args.max_nonfinite:
            raise UserError(
                f"the loss was non-finite in {state.streak} consecutive steps (epoch {epoch + 1}, "
                f"iteration {it + 1}; --max_nonfinite {args.max_nonfinite}); those steps were skipped "
                f"and {RunFiles.of(args).last} keeps the last saved state: lower --lr, check "
                "the data, or use --amp off"
            )
        if stopping or (
            args.save_every and (it + 1) % args.save_every == 0 and it + 1 < args.iters_per_epoch
        ):
            checkpoint(state)
        if stopping:
            bar.close()
            return None
        if (it + 1) % args.log_interval == 0 and not bar.disable:
            means = (state.losses / max(state.applied, 1)).tolist()
            lr = run.optimizer.param_groups[0]["lr"]
            bar.set_postfix(
                {n: f"{v:.3f}" for n, v in zip(TERMS[run.method], means)},
                lr=f"{lr:.2e}",
                **({"skipped": state.skipped} if state.skipped else {}),
            )
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


def build_loaders(args: argparse.Namespace, data: DatasetFiles, d: Dist):
    """The split and the loaders: labelled (+ unlabelled for semi) train loaders and the test loader.

    FixMatch and UniMatch: their crops, and their epoch (one shuffled pass over the unlabelled images, the
    labelled ones stretched to as many), which also sets --iters_per_epoch when unset."""
    if data.info.name == "demo" and (settings := demo_to_generate(data.root)) is not None:
        if d.main:
            again = " again (an older release wrote it)" if settings else ""
            print(f"generating the demo dataset in {data.root}{again} ...", flush=True)
            make_demo_dataset(data.root, **settings)
        barrier()
    if args.partial:
        labelled = unlabelled = data.list_ids("train")  # a missing root: a DataError saying how to get it
    elif args.split_dir:
        labelled, unlabelled = load_split(data, args.split_dir)
    else:
        labelled, unlabelled = get_split(data, args.num_labels, args.seed)
    semi = MODES[args.train_mode].semi
    if semi:  # images with no masks at all (a folder dataset's unlabelled/) join the unlabelled pool
        unlabelled = [*unlabelled, *data.unlabelled_ids()]
    workers = loader_workers(args.num_workers, d.device, d.world_size)
    common = dict(
        num_workers=workers, rank=d.rank, world_size=d.world_size, pin_memory=d.device.type == "cuda"
    )
    partial = dict(partial=args.partial, partial_seed=args.seed)
    batch = labelled_batch(args.batch_size, semi)
    online = args.method in ONLINE_METHODS
    if online:
        online_iterations(args, len(unlabelled), d.world_size)
    epoch = dict(epoch_length=len(unlabelled)) if online else {}
    loaders = [
        build_train_loader(
            SegmentationDataset(
                data,
                labelled,
                "train",
                crop_size=args.crop_size,
                scale_range=data.info.scale_range,
                augmentation=True,
                crops="unimatch_labelled" if online else "reference",
                hue_jitter=args.hue_jitter,
                **partial,
            ),
            batch,
            args.iters_per_epoch,
            seed=args.seed,
            **epoch,
            **common,
        )
    ]
    if semi:  # the unlabelled branch: plain crops at scale 1 (its labels only monitor, or are partial labels)
        loaders.append(
            build_train_loader(
                SegmentationDataset(
                    data,
                    unlabelled,
                    "train",
                    crop_size=args.crop_size,
                    scale_range=(1.0, 1.0),
                    augmentation=False,
                    crops="unimatch_unlabelled" if online else "reference",
                    **partial,
                ),
                batch,
                args.iters_per_epoch,
                seed=args.seed + 1_000_003,
                **epoch,
                **common,
            )
        )
    test_loader = build_test_loader(
        SegmentationDataset(data, data.list_ids("test"), "test"), batch_size=4, **common
    )
    return (labelled, unlabelled), loaders, test_loader


def step_settings(
    args: argparse.Namespace, info: DatasetInfo, autocast: Callable[[], AbstractContextManager], method: str
) -> MethodSettings:
    """The step's settings from the resolved flags."""
    online = method in ONLINE_METHODS
    return MethodSettings(
        method=method,
        conf_thresh=args.conf_thresh if online else 0.0,
        criterion=args.criterion or "ce",
        ohem_min_kept=ohem_min_kept(args.batch_size),
        apply_reco=args.apply_reco,
        reco_weight=args.reco_weight,
        strong_threshold=args.strong_threshold,
        weak_threshold=args.weak_threshold,
        temp=args.temp,
        num_queries=args.num_queries,
        num_negatives=args.num_negatives,
        apply_aug=args.apply_aug,
        partial=bool(args.partial),
        scale_range=info.scale_range,
        hue_jitter=args.hue_jitter,
        autocast=autocast,
    )


def build_run(args: argparse.Namespace, info: DatasetInfo, d: Dist) -> Run:
    """Model, teacher (mean teacher), optimiser and schedule (the reference's SGD Nesterov in one group with
    its staircase poly; FixMatch and UniMatch: methods.method_optimizer, poly per iteration), AMP scaler,
    DDP."""
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
    method = args.method if MODES[args.train_mode].semi else "sup"
    online = method in ONLINE_METHODS
    ema = EMA(model, 0.99, average_buffers=args.ema_buffers) if method == "meanteacher" else None
    student = (PerturbedNet if online else Views)(model, layout)
    teacher = Views(ema.model, layout) if ema else None
    mode, note = compile_mode(args.compile, d.device, d.world_size)
    if note and d.main:
        print(note, flush=True)
    for views in (student, teacher):
        if views is not None:
            compile_in_place(views, mode)  # before DDP wraps it, as torch.compile's documentation advises
    if d.world_size > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if online:
        optimizer = method_optimizer(model, args.lr, args.lr_multi, args.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
        )
    autocast = autocast_for(d.device, args.amp)
    compile_s = None
    if mode != "off":  # compile before the first epoch, so its it/s are the compiled step's
        compile_s = warm_up(warm_up_calls(args, method, student, teacher), d.device, autocast, mode)
        if d.main:
            print(f"torch.compile ({mode}): compiled in {compile_s:.1f} s", flush=True)
    return Run(
        args=args,
        info=info,
        dist=d,
        method=method,
        settings=step_settings(args, info, autocast, method),
        model=model,
        student=student,
        ema=ema,
        optimizer=optimizer,
        scheduler=None if online else PolyLR(optimizer, args.epochs, power=0.9, min_lr=1e-6),
        scaler=torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16"),
        autocast=autocast,
        teacher=teacher,
        compile_mode=mode,
        compile_s=compile_s,
    )


def warm_up_calls(
    args: argparse.Namespace, method: str, student: nn.Module, teacher: nn.Module | None
) -> list:
    """The forward calls of a training step (acceleration.warm_up's), with the step's shapes; FixMatch's and
    UniMatch's eval-mode forward of the mix batch compiles in the first step."""
    crop, batch, reco = (3, *args.crop_size), args.batch_size, args.apply_reco
    if method == "sup":
        return [(student, [(labelled_batch(batch, semi=False), *crop)], dict(with_rep=reco), True)]
    if method == "meanteacher":
        return [
            (student, [(batch, *crop)] * 2, dict(with_rep=reco), True),
            (teacher, [(batch, *crop)], dict(with_rep=False), False),
        ]
    strong = 2 * batch if method == "unimatch" else batch
    return [
        (
            student,
            [(2 * batch, *crop)],
            dict(rep_rows=batch if reco else 0, perturb=method == "unimatch"),
            True,
        ),
        (student, [(strong, *crop)], dict(rep_rows=strong if reco else 0), True),
    ]


def resume_config(args: argparse.Namespace) -> dict:
    """The flags a resumed run must share with the run it continues (as plain, comparable values)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in RESUME_KEYS}


def save_last(
    run: Run, path: Path, epoch: int, best: float, metrics: np.ndarray, inside: dict | None = None
) -> None:
    """The resume checkpoint: one dict with everything needed to continue after `epoch`, or inside it at the
    position `inside` (an EpochState.state_dict()); written atomically."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler and run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch + 1 if inside is None else epoch,
        "best_miou": best,
        "metrics": torch.from_numpy(metrics),
        "config": resume_config(run.args),
        "wall_s": run.wall_s(),
    }
    if run.ema is not None:
        state |= {"teacher": run.ema.model.state_dict(), "ema_step": run.ema.step}
    if inside is not None:
        state["epoch_state"] = inside
    save_file(lambda file: torch.save(state, file), path)


def load_last(run: Run, path: Path) -> tuple[int, float, np.ndarray, dict | None]:
    """Restore a run from its resume checkpoint; returns (epoch to run, best mIoU, metric array, the state of
    that epoch's steps done so far or None to start it)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: nothing to resume, {path} does not exist; "
            f"run without --resume to start, or pass the path of a {LAST}"
        )
    fix = f"pass a {LAST} written by this project, or run without --resume"
    state = read_torch_file(path, "--resume:", fix, run.dist.device)
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"--resume: {path} is not a resume checkpoint ({LAST}) of this project")
    ours = resume_config(run.args)
    # written before --method existed: the reference's method
    theirs = {"method": "meanteacher" if run.ema is not None else None} | UNRECORDED | state["config"]
    differ = [k for k in ours if theirs.get(k) != ours[k]]
    if differ:
        detail = ", ".join(f"--{k} {theirs.get(k)} (now {ours[k]})" for k in differ)
        raise UserError(
            f"--resume: {path} was written by another configuration: {detail}; "
            "use the same flags or another --log_dir"
        )
    needed = {"model", "optimizer", "scheduler", "scaler", "epoch", "best_miou", "metrics"}
    missing = sorted(needed - state.keys() | ({"teacher", "ema_step"} - state.keys() if run.ema else set()))
    if missing:
        raise UserError(
            f"--resume: {path} lacks {', '.join(missing)}, so it is not a complete {LAST}; "
            "pass another file, or run without --resume"
        )
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None:
            run.ema.model.load_state_dict(state["teacher"])
            run.ema.step = state["ema_step"]
        run.wall_before = float(state.get("wall_s", 0.0))  # absent from checkpoints of older versions
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--resume: {path} does not fit this run ({cause}); pass a {LAST} written with the "
            "same flags, or run without --resume"
        ) from None
    return state["epoch"], state["best_miou"], state["metrics"].cpu().numpy(), state.get("epoch_state")


def draw_run_figure(args: argparse.Namespace, out: RunWriter, data: DatasetFiles) -> str:
    """visual.py's figure of the best weights on a few test images that cover the classes, as visual.png."""
    index = covering_test_images(data, count=4)
    return str(
        draw_comparison(
            data,
            [out.files.weights],
            [args.name],
            index=index,
            out=out.files.visual,
            backbone=args.backbone,
            resnet_depth=args.resnet_depth,
            device="cpu",
        )
    )


def train(
    args: argparse.Namespace, argv: Sequence[str] | None = None, stop: StopSignals | None = None
) -> dict:
    """Train one run end to end; returns the best test mIoU and the output paths.

    A signal that `stop` caught ends the run after the current step: last.pth is saved, a line gives the
    command that continues (from `argv`, default sys.argv[1:]), and SystemExit carries faults.exit_code."""
    started_at = time.perf_counter()
    stop = stop or StopSignals()  # never entered: a library call leaves the host process's signals alone
    use_deterministic(args.deterministic)  # before CUDA starts
    d = init_distributed(args)
    args = resolve_args(args)
    data = resolve_dataset(args.dataset, args.data_root)
    info = data.info
    semi = MODES[args.train_mode].semi
    split, loaders, test_loader = build_loaders(args, data, d)
    run = build_run(args, info, d)
    run.started = started_at  # the wall time counts the set-up too
    columns = metric_columns(semi, TERMS[run.method])
    metrics, start_epoch, best, resumed = np.zeros((args.epochs, len(columns))), 0, -1.0, None
    if args.resume:
        path = RunFiles.of(args).last if args.resume in ("last", "auto") else Path(args.resume)
        if args.resume != "auto" or path.is_file():  # auto: a first launch starts, a restart continues
            start_epoch, best, metrics, resumed = load_last(run, path)
    out = RunWriter(args, columns, start_epoch) if d.main else None
    if out:
        out.write_start(*split, d.device, d.world_size)
        print(start_line(args, split, d, start_epoch, resumed), flush=True)
    eval_model = run.ema.model if run.ema is not None else run.model  # FixMatch, UniMatch: the network itself
    stop.arm()  # from here on a stop signal ends the run after a step, with last.pth saved
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        state = EpochState(len(TERMS[run.method]), 2 if semi else 1, info.num_classes, d.device)
        if resumed and epoch == start_epoch:
            state.load_state_dict(resumed, d.rank, d.world_size)

        def checkpoint(inside: EpochState) -> None:
            position = inside.state_dict()  # every rank takes part: it gathers every rank's sums
            if out:
                save_last(run, out.files.last, epoch, best, metrics, position)

        row = train_one_epoch(run, loaders, epoch, state, stop, checkpoint)
        if row is None:  # stopped by a signal, and last.pth holds the step it stopped after
            shutdown()  # every rank waits for rank 0's save: torchrun ends all ranks when one exits
            if out:
                out.close()
                resume = resume_command(sys.argv[1:] if argv is None else argv, d.world_size)
                print(
                    stopped_line(
                        stop.received, epoch, state.iteration, args.iters_per_epoch, out.files.last, resume
                    ),
                    flush=True,
                )
            raise SystemExit(exit_code(stop.received or signal.SIGTERM))
        lr = run.optimizer.param_groups[0]["lr"]  # the epoch's (FixMatch, UniMatch: its last step's)
        broadcast_buffers(eval_model)  # every rank evaluates the weights rank 0 saves (and resumes from)
        test = evaluate(
            eval_model,
            test_loader,
            info.num_classes,
            d.device,
            args.amp,
            progress=d.main and sys.stderr.isatty(),
        )
        if run.scheduler is not None:
            run.scheduler.step()
        metrics[epoch] = row + [test["loss"], test["miou"], test["acc"]]
        is_best = test["miou"] >= best
        best = max(best, test["miou"])
        if out:
            out.write_epoch(epoch, lr, metrics, eval_model, is_best)
            plot_curves(metrics[: epoch + 1], columns, args.name, out.files.curves)
            save_last(run, out.files.last, epoch, best, metrics)
            print(
                epoch_line(
                    epoch,
                    args.iters_per_epoch,
                    dict(zip(columns[:-3], row)),
                    test,
                    best,
                    lr,
                    time.perf_counter() - started,
                    state.skipped,
                ),
                flush=True,
            )
    result = {"best_miou": best, "weights": None, "run_dir": None}
    if out:
        out.close()
        result |= {"weights": str(out.files.weights), "run_dir": str(out.files.folder)}
        if not args.no_visual:
            result["figure"] = draw_run_figure(args, out, data)
        result["summary"] = out.write_summary(metrics, run.wall_s())
    shutdown()
    return result


def start_line(
    args: argparse.Namespace,
    split: tuple[Sequence[str], Sequence[str]],
    d: Dist,
    start_epoch: int,
    resumed: dict | None,
) -> str:
    """The line a run starts with: its name, split sizes, schedule, device, and where it resumes."""
    processes = f" x {d.world_size} processes" if d.world_size > 1 else ""
    resuming = f", resuming at epoch {start_epoch + 1}" if start_epoch or resumed else ""
    if resumed:
        resuming += f" after iteration {resumed['iteration']}"
    return (
        f"{args.name}: {len(split[0])} labelled / {len(split[1])} unlabelled images, {args.epochs} epochs x "
        f"{args.iters_per_epoch} iterations, device {d.device}{processes}{resuming}"
    )


def epoch_line(
    epoch: int,
    iters_per_epoch: int,
    train: dict[str, float],
    test: dict[str, float],
    best: float,
    lr: float,
    seconds: float,
    skipped: int,
) -> str:
    """The reference's one line per epoch (EPOCH, ITER, training terms || test || best, lr), plus the time."""
    train_part = " | ".join(
        f"{name} {value:.4f}" if not math.isnan(value) else f"{name} n/a" for name, value in train.items()
    )
    test_part = f"test loss {test['loss']:.4f} | mIoU {test['miou']:.4f} | acc {test['acc']:.4f}"
    skips = f" | non-finite steps skipped: {skipped}" if skipped else ""
    return (
        f"EPOCH {epoch + 1:4d} ITER {(epoch + 1) * iters_per_epoch:6d} | {train_part} || {test_part} || "
        f"best mIoU {best:.4f} | lr {lr:.2e} | {seconds:.1f} s{skips}"
    )


def stopped_line(
    signum: int | None, epoch: int, iteration: int, iters_per_epoch: int, last: Path, resume: str
) -> str:
    """What a run stopped by a signal says: where it stopped, what it saved, the command that continues."""
    name = signal.Signals(signum or signal.SIGTERM).name
    return (
        f"stopped by {name} in epoch {epoch + 1} after iteration {iteration}/{iters_per_epoch}; {last} is "
        f"saved. Continue with: {resume}"
    )


def main(mode: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of the four training scripts."""
    with StopSignals() as stop:
        run_cli(lambda a: train(get_args_parser(mode).parse_args(a), a, stop), argv)

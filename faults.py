"""Faults of long runs: stop signals (preemption), the per-step agreement of all ranks on stopping and on
skipping a non-finite loss, the position inside an epoch that a mid-epoch checkpoint keeps, and exit codes."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import torch
import torch.distributed as dist

from module_list import ConfMatrix, copy_tensors_

# Exit code of a run stopped by a signal after saving last.pth: 128 + the signal's number, what a shell
# reports for a process that signal killed (143 for SIGTERM, 130 for SIGINT), so job scripts and schedulers
# that requeue a preempted job on 143 keep doing so. Errors (a flag, a file, a full disk, a run whose loss
# stays non-finite) exit with 2, through helpers.run_cli.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_signals_to_catch() -> tuple[int, ...]:
    """The stop signals this process was not started ignoring: a shell starts `cmd &` with SIGINT ignored,
    so that a Ctrl-C meant for the foreground job leaves it running, and catching SIGINT would undo that."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


def exit_code(signum: int) -> int:
    """The process exit code after a graceful stop on signal `signum`."""
    return 128 + signum


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's init: stop signals (sent to the whole job on preemption or Ctrl-C) are left to the
    training process, which finishes its step and saves before it ends its workers."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@functools.cache
def kill_loader_workers_at_exit() -> None:
    """Once per process, before its first loader workers start: at exit, kill the workers still alive (a
    loader kept until then by a reference cycle or an exception's traceback). They ignore SIGTERM, and
    multiprocessing's own exit hook ends daemonic children with SIGTERM and then waits for them: forever,
    without this. Registered after that hook (torch imports multiprocessing), so it runs first."""
    atexit.register(kill_daemonic_children)


def kill_daemonic_children() -> None:
    """SIGKILL and reap this process's daemonic multiprocessing children (its loader workers)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


class StopSignals:
    """Inside its context and once armed (when training starts, in the main thread), the first SIGTERM or
    SIGINT only records a stop request, so the current step can finish and be saved; a second one acts as
    if no handler were installed (stop now). A repeat within `repeat_after` seconds of the first counts as
    the same request: a scheduler that signals every process of a job (Slurm) while torchrun or study.py
    also passes the signal on delivers it twice at once. Before arming (set-up, rendezvous) the signals
    keep their default action, which also ends a process blocked in a collective (a Python handler would
    never run)."""

    def __init__(self, repeat_after: float = 3.0) -> None:
        self.received: int | None = None
        self.repeat_after = repeat_after
        self._received_at = 0.0
        self._entered = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self._entered = True
        return self

    def arm(self) -> None:
        """Start catching the stop signals not ignored (stop_signals_to_catch), only inside the context and in
        the main thread."""
        if self._entered and not self._previous and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in stop_signals_to_catch()}

    def __exit__(self, *exc) -> None:
        self._entered = False
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
        elif time.monotonic() - self._received_at >= self.repeat_after:
            self.__exit__()
            signal.raise_signal(signum)


class StepGuard:
    """Decides, once per step and identically on every rank, whether to skip the step's update (the loss is
    non-finite on some rank) and whether to stop after it (some rank received a stop signal).

    The decision costs one host read of two flags per step (plus one 2-element all-reduce under torchrun),
    placed after the backward pass is queued so that it overlaps the device's work. A skip without any host
    read would need a device-side masked update of the weights, the momentum and the teacher (fused optimiser
    internals, copies of every parameter); a skip is rare, a read per step is cheap, and the same read makes
    the stop exact to the step. fp16's GradScaler reads its own overflow flag per step in the same way.
    """

    def __init__(self, stop: StopSignals, kept: Sequence[torch.Tensor]):
        self.stop = stop
        self.kept = list(kept)  # what a forward pass changes besides the loss: BN statistics, monitor counts
        self.saved = [t.clone() for t in self.kept]

    def before_step(self) -> None:
        """Remember the tensors a skipped step must leave unchanged."""
        copy_tensors_(self.saved, self.kept)

    def decide(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(skip the update, stop after this step), alike on every rank; a skip restores the kept tensors."""
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach())).any().float(),
                torch.full((), float(self.stop.received is not None), device=loss.device),
            ]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, stop = (bool(v) for v in flags.tolist())
        if skip:
            copy_tensors_(self.kept, self.saved)
        return skip, stop


class EpochState:
    """Where an epoch stands and what it has summed so far: all a mid-epoch checkpoint needs to continue it
    exactly (the loaders are pure in (seed, epoch, rank), so their position is the iteration alone)."""

    def __init__(self, num_losses: int, num_monitors: int, num_classes: int, device: torch.device):
        self.iteration = 0  # steps done
        self.losses = torch.zeros(num_losses, device=device)  # sums of the logged losses of applied steps
        self.monitors = [ConfMatrix(num_classes, device) for _ in range(num_monitors)]
        self.applied = 0  # steps whose update was applied
        self.skipped = 0  # steps skipped for a non-finite loss
        self.streak = 0  # consecutive skipped steps up to now

    def record(self, logged: torch.Tensor, skipped: bool) -> None:
        """Count one finished step."""
        self.iteration += 1
        if skipped:
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
        else:
            self.losses += logged
            self.applied, self.streak = self.applied + 1, 0

    def state_dict(self) -> dict:
        """The state as plain values and CPU tensors, for last.pth, with the sums of every rank (under
        torchrun a collective: every rank calls it)."""
        return {
            "iteration": self.iteration,
            "applied": self.applied,
            "skipped": self.skipped,
            "streak": self.streak,
            "losses": _per_rank(self.losses).cpu(),
            "confusion": [_per_rank(m.mat).cpu() for m in self.monitors],
        }

    def load_state_dict(self, state: dict, rank: int, world_size: int) -> None:
        """Restore what state_dict() returned: each rank takes back its own sums (exact to the bit).
        Resumed by another number of processes, rank 0 takes the totals and the others start from
        zero, so the epoch's final all-reduce still counts every step once."""
        self.iteration, self.applied = int(state["iteration"]), int(state["applied"])
        self.skipped, self.streak = int(state["skipped"]), int(state["streak"])
        for mine, saved in zip(
            [self.losses, *(m.mat for m in self.monitors)],
            [state["losses"], *state["confusion"]],
            strict=True,
        ):
            if len(saved) == world_size:
                mine.copy_(saved[rank])
            else:
                mine.copy_(saved.sum(0) if rank == 0 else torch.zeros_like(saved[0]))


def _per_rank(tensor: torch.Tensor) -> torch.Tensor:
    """[world_size, ...]: this tensor as every rank holds it (under torchrun a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor[None].clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def resume_command(argv: Sequence[str], world_size: int) -> str:
    """The command line that continues this run: the same script and flags, with a bare --resume."""
    flags, skip_value = [], False
    for word in argv:
        if skip_value and not word.startswith("-"):
            skip_value = False
            continue
        skip_value = word == "--resume"
        if not (skip_value or word.startswith("--resume=")):
            flags.append(word)
    launcher = ["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *flags, "--resume"])

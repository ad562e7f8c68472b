"""Studies: a grid of ordinary training runs (methods x label budgets x seeds) and its paper-style report.

python study.py run --out DIR --seeds 0 1 2 --num_labels 60 200 \
    --methods sup classmix classmix+reco [-- flags]
python study.py report DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset_table import ONLINE_DEFAULTED, PARTIAL_SETTINGS  # noqa: E402
from faults import STOP_SIGNALS, exit_code  # noqa: E402
from helpers import UserError, atomic_save, run_cli, write_json  # noqa: E402
from module_list import MIX_MODES, ONLINE_METHODS  # noqa: E402
from run_folder import CONFIG, LAST, LOG_SUFFIX, MODE_SCRIPTS, RunFiles, RunRecord, find_runs  # noqa: E402
from splits import read_split_dir, shipped_splits  # noqa: E402

REPO = Path(__file__).resolve().parent
# sup, the mean teacher by its mixing, then FixMatch and UniMatch (train_semisup.py --method)
METHOD_BASES = ("sup", *MIX_MODES, *ONLINE_METHODS)
# Flags the study sets for each cell: they may not be among the extra training flags.
CELL_FLAGS = (
    "--seed",
    "--num_labels",
    "--partial",
    "--split_dir",
    "--split",
    "--apply_aug",
    "--apply_reco",
    "--method",
    "--log_dir",
    "--weights_dir",
    "--resume",
)
# Training flags naming a file or folder: made absolute, so that a cell's command line runs from any folder.
CELL_PATH_FLAGS = ("--data_root", "--pretrained")
# Run arguments that are the grid's axes (they differ between cells by design) ...
GRID_AXES = {
    "seed",
    "num_labels",
    "partial",
    "split_dir",
    "split",
    "apply_aug",
    "apply_reco",
    "method",
    "name",
    "train_mode",
}
# ... and those that say where or how a run was kept, not what was trained.
NOT_COMPARED = {
    "data_root",
    "log_dir",
    "weights_dir",
    "resume",
    "log_interval",
    "no_visual",
    "num_workers",
    "gpu",
    "device",
    "id",
    "mode",
    "port",
    "save_every",
}
# Published val mIoU (%) per dataset (--paper): each source with its (method, budget) numbers.
_RECO = "the reference ReCo README's published checkpoints (one run each)"
_UNIMATCH = (
    "UniMatch's README (Yang et al., CVPR 2023; DeepLabv3+ ResNet-101, crop 321, the classic "
    "splits; its supervised baseline in the sup row)"
)
PAPER = {
    "pascal": {
        _RECO: {("sup", "60"): 36.06, ("classmix", "60"): 53.71, ("classmix+reco", "60"): 57.12},
        _UNIMATCH: {
            **{
                ("unimatch", f"pascal/{n}"): v
                for n, v in zip((92, 183, 366, 732, 1464), (75.2, 77.2, 78.8, 79.9, 81.2))
            },
            **{
                ("sup", f"pascal/{n}"): v
                for n, v in zip((92, 183, 366, 732, 1464), (45.1, 55.3, 64.8, 69.7, 73.5))
            },
        },
    },
    "cityscapes": {_RECO: {("sup", "20"): 38.10, ("classmix", "20"): 45.13, ("classmix+reco", "20"): 50.14}},
}


# ---------------------------------------------------------------------------------------------
# study.py run: the grid's cells, their states and commands, one subprocess each
# ---------------------------------------------------------------------------------------------


def script_of(semi: bool, partial: bool) -> str:
    """The training script of a cell: supervised or semi-supervised, on full or partial labels."""
    return MODE_SCRIPTS[("semi" if semi else "sup") + ("_partial" if partial else "")]


def parse_method(method: str) -> tuple[str, bool]:
    """'classmix+reco' -> ('classmix', True); a UserError naming --methods for anything else."""
    base, plus, reco = method.partition("+")
    if base not in METHOD_BASES or (plus and reco != "reco"):
        raise UserError(
            f"--methods: unknown method {method!r}; use {', '.join(METHOD_BASES)}, each optionally "
            "with +reco (e.g. classmix+reco, unimatch+reco)"
        )
    return base, bool(plus)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its method, label budget (the table's column), seed and folder."""

    method: str
    budget: str
    budget_flags: tuple[str, ...]
    seed: int
    folder: Path

    def command(self, partial: bool, extra: Sequence[str], resume: bool) -> list[str]:
        """The training script's command line of this cell (outputs inside the cell's folder)."""
        base, reco = parse_method(self.method)
        script = REPO / script_of(base != "sup", partial)
        return [
            sys.executable,
            str(script),
            *self.budget_flags,
            "--seed",
            str(self.seed),
            *(
                ["--method", base]
                if base in ONLINE_METHODS
                else ["--apply_aug", base]
                if base != "sup"
                else []
            ),
            *(["--apply_reco"] if reco else []),
            "--log_dir",
            str(self.folder / "log"),
            "--weights_dir",
            str(self.folder / "weights"),
            *extra,
            *(["--resume"] if resume else []),
        ]

    def run_dir(self) -> Path | None:
        """The run folder the training script made in the cell's --log_dir (None before it started)."""
        log_dir = self.folder / "log"
        found = (
            sorted(p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if log_dir.is_dir()
            else []
        )
        if len(found) > 1:
            raise UserError(
                f"{log_dir} holds several runs ({', '.join(p.name for p in found)}); a study cell "
                "holds one: move the others away"
            )
        return found[0] if found else None

    def state(self) -> str:
        """'done' (finished), 'interrupted' (last.pth of an unfinished run: resume it) or 'new'."""
        run_dir = self.run_dir()
        if run_dir is None:
            return "new"
        files = RunFiles(run_dir)
        if files.finished():
            return "done"
        return "interrupted" if files.last.is_file() else "new"


def budgets_of(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    """The grid's columns: (name, training flags) per label budget."""
    if args.num_labels is not None:
        budgets = [
            (str(n) if n else "all", ("--num_labels", str(n))) for n in args.num_labels
        ]  # 0: every image
    elif args.partial is not None:
        for p in args.partial:
            if p not in PARTIAL_SETTINGS:
                raise UserError(f"--partial {p}: choose among {', '.join(PARTIAL_SETTINGS)}")
        budgets = [(p, ("--partial", p)) for p in args.partial]
    elif args.splits is not None:
        for name in args.splits:
            if name not in shipped_splits():
                raise UserError(
                    f"--splits {name} is not a shipped split: choose among {', '.join(shipped_splits())} "
                    "(dataset/splits/README.md), or pass your own split folders with --split_dirs"
                )
        budgets = [(s, ("--split", s)) for s in args.splits]
    else:
        for d in args.split_dirs:
            if not (Path(d) / "labelled.txt").is_file():
                raise UserError(
                    f"--split_dirs: {d} has no labelled.txt; pass folders written by "
                    "dataset/make_splits.py (labelled.txt, unlabelled.txt)"
                )
        # named by their size, as the runs are (a split's size is its --num_labels) and the report's columns
        budgets = [
            (str(len(read_split_dir(d)[0])), ("--split_dir", str(Path(d).resolve()))) for d in args.split_dirs
        ]
    names = [name for name, _ in budgets]
    if len(set(names)) < len(names):
        raise UserError(
            f"the label budgets {names} repeat a name; pass each once (split folders of one size "
            "belong to separate studies)"
        )
    return budgets


def plan(args: argparse.Namespace, extra: Sequence[str]) -> tuple[bool, list[Cell]]:
    """Check the study's flags; returns (partial labels?, the cells in the order they run)."""
    partial = args.partial is not None
    scripts = (script_of(False, partial), script_of(True, partial))
    if args.script and args.script not in scripts:
        budget_flags = "--partial" if partial else "--num_labels, --splits or --split_dirs"
        raise UserError(
            f"--script {args.script} does not match the label budgets: use "
            f"{' or '.join(scripts)} with {budget_flags}"
        )
    for token in extra:
        if token.split("=")[0] in CELL_FLAGS:
            raise UserError(
                f"{token.split('=')[0]} is set by the study for each cell; drop it from the training "
                "flags after --"
            )
    methods = list(dict.fromkeys(args.methods))
    online = [m for m in methods if parse_method(m)[0] in ONLINE_METHODS]
    if partial and online:
        raise UserError(
            f"--methods {online[0]}: FixMatch and UniMatch do not train on partial labels; give "
            "label budgets (--num_labels, --splits or --split_dirs) or drop it"
        )
    budgets = budgets_of(args)
    dataset = flag_values(extra).get("--dataset")
    for name in args.splits or []:  # else every cell would stop on it
        if dataset and name.split("/")[0] != dataset[-1]:
            raise UserError(
                f"--splits {name} is a split of {name.split('/')[0]}, not of --dataset {dataset[-1]}: "
                "pass another --dataset after -- or other --splits"
            )
    cells = [
        Cell(
            m,
            name,
            flags,
            seed,
            Path(args.out).resolve() / "cells" / m / name.replace("/", "_") / f"seed{seed}",
        )
        for seed in dict.fromkeys(args.seeds)
        for name, flags in budgets
        for m in methods
    ]
    return partial, cells


def flag_values(tokens: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Training flags as {flag: values}, '--epochs 2' and '--epochs=2' alike; a repeated flag: its last."""
    flags: dict[str, tuple[str, ...]] = {}
    name = ""
    for token in tokens:
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            flags[name] = (value,) if equals else ()
        else:
            flags[name] = (*flags.get(name, ()), token)
    return flags


def absolute_paths(extra: Sequence[str]) -> list[str]:
    """The training flags with the paths of CELL_PATH_FLAGS made absolute (--pretrained only where it names a
    file that exists, not imagenet or none); '--flag=value' becomes two tokens there."""
    tokens: list[str] = []
    for token in extra:
        name, equals, value = token.partition("=")
        tokens += [name, value] if equals and name in CELL_PATH_FLAGS else [token]
    for i in range(1, len(tokens)):
        flag, value = tokens[i - 1], tokens[i]
        if (
            flag in CELL_PATH_FLAGS
            and not value.startswith("--")
            and (flag == "--data_root" or Path(value).exists())
        ):
            tokens[i] = str(Path(value).resolve())
    return tokens


def check_study_file(out: Path, partial: bool, extra: Sequence[str]) -> None:
    """Record the study's shared training flags in study.json; refuse to continue a study with other ones
    (in any order), naming each flag that changed."""
    path = out / "study.json"
    ours = {"partial_labels": partial, "training_flags": list(extra)}
    if not path.is_file():
        write_json(path, ours, indent=1)
        return
    theirs = json.loads(path.read_text(encoding="utf-8"))
    before, now = flag_values(theirs["training_flags"]), flag_values(extra)

    def said(flags: dict[str, tuple[str, ...]], name: str) -> str:
        return shlex.join([name, *flags[name]]) if name in flags else "not given"

    changed = [
        f"{said(before, name)} before, {said(now, name)} now"
        if name in before
        else f"{name} not given before, {said(now, name)} now"
        for name in dict.fromkeys([*before, *now])
        if before.get(name) != now.get(name)
    ]
    if theirs["partial_labels"] != partial:
        changed.append(
            f"{'--partial' if theirs['partial_labels'] else 'full-label'} budgets before, "
            f"{'--partial' if partial else 'full-label'} budgets now"
        )
    if changed:
        raise UserError(
            f"{path}: this study ran its cells with other training flags ({'; '.join(changed)}); finished "
            "cells would mix configurations: pass the same flags after --, or use another --out"
        )


class CellProcesses:
    """The running cells' processes and the GPUs free for the next one; study.py's stop signals go to cells.

    Each cell runs in its own process group, so a terminal's Ctrl-C (or a kill of the study's group) reaches
    study.py alone, which passes it on once: the training scripts finish their step, save last.pth and stop
    (a second signal, passed on too, stops them at once if it comes 3 s or more after the first), and no
    further cell starts."""

    def __init__(self, gpus: Sequence[str] | None):
        self.gpus: queue.Queue = queue.Queue()
        for gpu in gpus or [None]:
            self.gpus.put(gpu)
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # re-entrant: a second signal may arrive inside the handler
        self.stopped_by: int | None = None

    def stop(self, signum: int, frame: object = None) -> None:
        """Signal handler: pass the signal on to every running cell and start no other."""
        with self.lock:
            self.stopped_by = signum
            for process in self.running:
                process.send_signal(signum)


def run_cell(cell: Cell, command: list[str], cells: CellProcesses) -> int | None:
    """Run one cell's command with its output appended to cell.log, on a free GPU if any; returns its exit
    code (None: not started, the study was stopped first)."""
    gpu = cells.gpus.get()
    try:
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        with cells.lock:
            if cells.stopped_by is not None:
                return None
            cell.folder.mkdir(parents=True, exist_ok=True)
            # the cell writes to its own copy of the file
            with open(cell.folder / "cell.log", "a", encoding="utf-8") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
                log.flush()
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0
                )
            cells.running.add(process)
        code = process.wait()
        with cells.lock:
            cells.running.discard(process)
        return code
    finally:
        cells.gpus.put(gpu)


def cell_result(cell: Cell, code: int | None, before: str) -> str:
    """The state column of a cell that was to run, from its exit code and its run folder."""
    if code is None:
        return "not started"
    # a graceful stop exits 128 + the signal; one before the script caught signals dies of it (-signal)
    stopped = {c: signal.Signals(s).name for s in STOP_SIGNALS for c in (exit_code(s), -s)}
    if code in stopped:
        return (
            f"stopped by {stopped[code]}, "
            + ("resumes" if cell.state() == "interrupted" else "starts again")
            + " on the next run"
        )
    if code == 0 and cell.state() == "done":
        return ("resumed, " if before == "interrupted" else "") + "done"
    return f"FAILED (exit {code}): {last_error(cell.folder / 'cell.log')}"


def last_error(log: Path) -> str:
    """The line of a failed cell's log that says why (its 'error:' line, else its last line)."""
    lines = [
        line.strip()
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    return next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")


def start_line(out: Path, states: dict, gpus: Sequence[str] | None) -> str:
    """The line a study starts with: its folder, its cells, how many run or resume, and on which GPUs."""
    todo = sum(state != "done" for state in states.values())
    to_resume = sum(state == "interrupted" for state in states.values())
    on_gpus = f" on GPUs {' '.join(gpus)}" if gpus else ""
    return f"study {out}: {len(states)} cells, {todo} to run ({to_resume} to resume){on_gpus}"


def stopped_message(signum: int, results: Iterable[str]) -> str:
    """What a study stopped by a signal says: how many cells saved and stopped, how many never started."""
    results = list(results)
    stopped = sum(r.startswith("stopped") for r in results)
    not_started = sum(r == "not started" for r in results)
    return (
        f"stopped by {signal.Signals(signum).name}: {stopped} running cell(s) saved {LAST} and stopped, "
        f"{not_started} not started; run the same command again to resume them and run the rest"
    )


def run_study(args: argparse.Namespace, extra: Sequence[str]) -> None:
    """study.py run: every cell not finished, one after another or one per GPU; then a table of states."""
    extra = absolute_paths(extra)
    partial, cells = plan(args, extra)
    out = Path(args.out).resolve()
    states = {cell: cell.state() for cell in cells}
    todo = [cell for cell in cells if states[cell] != "done"]
    check_study_file(out, partial, extra)  # --print too: a job array runs the lines it prints
    if args.print_only:
        for cell in todo:
            print(shlex.join(cell.command(partial, extra, states[cell] == "interrupted")))
        print(
            f"{len(todo)} of {len(cells)} cells to run ({len(cells) - len(todo)} finished)", file=sys.stderr
        )
        return
    processes = CellProcesses(args.gpus)
    result = {cell: "skipped (finished before)" for cell in cells if states[cell] == "done"}
    print(start_line(out, states, args.gpus), flush=True)
    pool = ThreadPoolExecutor(max_workers=len(args.gpus or [None]))
    previous = {signum: signal.signal(signum, processes.stop) for signum in STOP_SIGNALS}
    try:
        futures = {
            pool.submit(
                run_cell, cell, cell.command(partial, extra, states[cell] == "interrupted"), processes
            ): cell
            for cell in todo
        }
        bar = tqdm(
            as_completed(futures), total=len(todo), desc="cells", unit="cell", disable=not sys.stderr.isatty()
        )
        for future in bar:
            cell = futures[future]
            result[cell] = cell_result(cell, future.result(), states[cell])
            if result[cell] != "not started":
                tqdm.write(f"{cell.method} {cell.budget} seed {cell.seed}: {result[cell]}")
    finally:
        pool.shutdown(cancel_futures=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(
        format_table(
            ["method", "budget", "seed", "state", "folder"],
            [[c.method, c.budget, str(c.seed), result[c], str(c.folder.relative_to(out))] for c in cells],
        )
    )
    if processes.stopped_by is not None:
        print(stopped_message(processes.stopped_by, result.values()), file=sys.stderr)
        raise SystemExit(exit_code(processes.stopped_by))
    failed = [c for c in cells if not result[c].endswith("done") and not result[c].startswith("skipped")]
    if failed:
        print(
            f"{len(failed)} of {len(cells)} cells failed or were stopped (their logs: <cell>/cell.log); "
            "fix the cause and run the same command again: finished cells are skipped, stopped ones resume",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"all {len(cells)} cells finished; next: python study.py report {shlex.quote(str(out))}")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows])


# ---------------------------------------------------------------------------------------------
# study.py report: runs found in folders -> mean +- std per method x budget (report.md, .csv, .png)
# ---------------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """One run found on disk: where, which grid cell, the configuration compared, its val mIoU per epoch."""

    source: Path  # the run folder (with config.json) or the .npy log (without)
    method: str
    budget: str  # the table's column: labelled images, a shipped split's name, all, or p0 ...
    labels: int  # labelled images (0: all of them, or partial labels)
    seed: int
    config: dict | None  # flags that must agree between runs of one report (None: no config.json)
    dataset: str
    test_miou: np.ndarray  # the filled epochs' val mIoU
    finished: bool


def method_name(semi: bool, aug: str | None, reco: bool, method: str | None = None) -> str:
    """The study's method name of a run: sup, cutout, cutmix or classmix (the mean teacher's mixing),
    fixmatch or unimatch, with +reco."""
    base = method if method in ONLINE_METHODS else aug if semi else "sup"
    return base + ("+reco" if reco else "")


def run_log(record: RunRecord) -> RunLog:
    """A run as the report counts it: its grid cell, the flags it is compared by, its val mIoU per epoch."""
    args = record.args
    miou, finished = record.val_miou()
    labels = int(args.get("num_labels") or 0)
    # a shipped split by its name: the field has two splits of one size (pascal/1_16, pascal/u2pl_1_16)
    budget = args.get("partial") or args.get("split") or (str(labels) if labels else "all")
    own_data = args.get("dataset") == "folder"  # the folder is what names the dataset
    compared = None
    if record.world_size is not None:  # read from its config.json
        compared = {k: v for k, v in args.items() if k not in GRID_AXES | NOT_COMPARED}
        compared["world_size"] = record.world_size
        # a shipped split vs the sampler
        compared["split folder"] = bool(args.get("split_dir") or args.get("split"))
        if own_data:
            compared["data_root"] = args.get("data_root")
    dataset = str(args.get("dataset")) + (f" {args.get('data_root')}" if own_data else "")
    method = method_name(record.semi, args.get("apply_aug"), bool(args.get("apply_reco")), args.get("method"))
    return RunLog(record.source, method, budget, labels, int(args["seed"]), compared, dataset, miou, finished)


def check_comparable(runs: Sequence[RunLog]) -> None:
    """Refuse runs that differ in anything but the grid's axes, or repeat a (method, budget, seed) cell."""
    if any(r.config is None for r in runs):  # runs known by name only: their name says the dataset, no more
        configs = [{"dataset": r.dataset} for r in runs]
    else:
        configs = [r.config for r in runs]
    differ = []
    for key in sorted({k for c in configs for k in c}):
        # a flag whose default follows --method need agree only among FixMatch and UniMatch runs, or the rest
        kinds: dict[bool, dict[str, list[RunLog]]] = defaultdict(lambda: defaultdict(list))
        for run, config in zip(runs, configs):
            online = key in ONLINE_DEFAULTED and parse_method(run.method)[0] in ONLINE_METHODS
            kinds[online][json.dumps(config.get(key))].append(run)
        for values in (v for v in kinds.values() if len(v) > 1):
            differ.append(
                f"{key if ' ' in key else '--' + key} "
                + " vs ".join(
                    f"{'unset' if v == 'null' else v} "
                    f"({len(rs)} run{'s' if len(rs) > 1 else ''}, e.g. {rs[0].source})"
                    for v, rs in values.items()
                )
            )
    if differ:
        raise UserError(
            "these runs differ in more than method, label budget and seed, so they are not one study: "
            + "; ".join(differ)
            + ". Report them separately (pass fewer folders)"
        )
    cells: dict[tuple, list[RunLog]] = defaultdict(list)
    for run in runs:
        cells[(run.method, run.budget, run.seed)].append(run)
    for (method, budget, seed), same in cells.items():
        if len(same) > 1:
            raise UserError(
                f"{method} at {budget} labels, seed {seed} was run more than once: "
                f"{', '.join(str(r.source) for r in same)}; pass only one of them"
            )


def budget_columns(stats: dict) -> list[str]:
    """Columns left to right: labelled-image budgets by size (splits of one size by name), then all
    labels, then partial settings p0 < p1 < p5 < p25."""
    sizes = {b: s.labels for (_, b), s in stats.items()}  # the published numbers are at the runs' budgets

    def order(budget: str) -> tuple[int, int, str]:
        if budget == "all":
            return (1, 0, budget)
        return (2, int(budget[1:]), budget) if budget in PARTIAL_SETTINGS else (0, sizes[budget], budget)

    return sorted(sizes, key=order)


def budget_kind(budgets: Sequence[str]) -> str:
    """What the columns count: partial-label settings or labelled images."""
    return "partial labels" if all(b in PARTIAL_SETTINGS for b in budgets) else "labelled images"


def method_order(method: str) -> tuple[int, bool]:
    """Rows top to bottom: sup, cutout, cutmix, classmix, each followed by its +reco."""
    base, reco = parse_method(method)
    return METHOD_BASES.index(base), reco


@dataclass
class Stat:
    """mean and sample std (n - 1; NaN for one seed) of the best and the final val mIoU (%) over seeds."""

    seeds: list[int]
    labels: int
    best: tuple[float, float]
    final: tuple[float, float]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) in percent; the std of one value is NaN."""
    v = 100 * np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def cell_stats(runs: Sequence[RunLog]) -> dict[tuple[str, str], Stat]:
    """(method, budget) -> Stat over the finished runs' seeds."""
    groups: dict[tuple[str, str], list[RunLog]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.budget)].append(run)
    return {
        key: Stat(
            sorted(r.seed for r in rs),
            rs[0].labels,
            mean_std([r.test_miou.max() for r in rs]),
            mean_std([r.test_miou[-1] for r in rs]),
        )
        for key, rs in groups.items()
    }


def flag_text(key: str, value) -> str:
    """A configuration entry as it reads on a command line: --key, --key v or --key v1 v2."""
    if value is True:
        return f"--{key}"
    return f"--{key} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))


def cell_text(mean: float, std: float, n: int) -> str:
    """'45.12 ± 1.03 (3)': mean ± std (n seeds) in percent."""
    return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"


def paper_numbers(
    paper: str | None, runs: Sequence[RunLog]
) -> tuple[dict[tuple[str, str], float], list[str]]:
    """({(method, budget): published mIoU (%)} at the runs' budgets, their sources) for --paper, checked on
    the runs."""
    if paper is None:
        return {}, []
    datasets = sorted({r.dataset for r in runs})
    if datasets != [paper]:
        raise UserError(
            f"--paper {paper}: these runs are on {', '.join(datasets)}; the published numbers are "
            f"for {paper}: drop --paper or report {paper} runs"
        )
    budgets = {r.budget for r in runs}
    shown = {
        source: {key: value for key, value in numbers.items() if key[1] in budgets}
        for source, numbers in PAPER[paper].items()
    }
    numbers = {key: value for found in shown.values() for key, value in found.items()}
    return numbers, [source for source, found in shown.items() if found]


def markdown(
    stats: dict,
    paper: dict,
    runs: Sequence[RunLog],
    left_out: Sequence[RunLog],
    folders: Sequence[Path],
    sources: Sequence[str] = (),
) -> str:
    """report.md: the shared configuration, then best and final val mIoU tables (methods x budgets)."""
    methods = sorted({m for m, _ in stats} | {m for m, _ in paper}, key=method_order)
    budgets = budget_columns(stats)
    kind = budget_kind(budgets)
    lines = [
        f"# Study report: {', '.join(sorted({r.dataset for r in runs}))}",
        "",
        f"{len(runs)} finished runs from {', '.join(str(f) for f in folders)}.",
    ]
    if runs[0].config is not None:
        shared = " ".join(
            flag_text(k, v)
            for k, v in sorted(runs[0].config.items())  # FixMatch, UniMatch and
            if " " not in k
            and k != "world_size"
            and v not in (None, False)  # the others may
            and all(r.config.get(k) == v for r in runs)
        )  # differ in ONLINE_DEFAULTED
        lines += [
            "",
            f"Shared by every run (world size {runs[0].config['world_size']}, "
            f"split folder {'yes' if runs[0].config['split folder'] else 'no'}):",
            "",
            f"`{shared}`",
        ]
    else:
        lines += ["", f"Some runs have no {CONFIG}: they were grouped by their file names only."]
    for title, field in (("Best", "best"), ("Final", "final")):
        lines += [
            "",
            f"## {title} val mIoU (%), mean ± std (seeds), columns: {kind}",
            "",
            "| method | " + " | ".join(budgets) + " |",
            "|---" * (len(budgets) + 1) + "|",
        ]
        for method in methods:
            row = [
                cell_text(*getattr(stats[(method, b)], field), len(stats[(method, b)].seeds))
                if (method, b) in stats
                else "–"
                for b in budgets
            ]
            if any(r != "–" for r in row):
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        if field == "best":
            for method in [m for m in methods if any((m, b) in paper for b in budgets)]:
                lines.append(
                    f"| {method} (paper) | "
                    + " | ".join(
                        f"{paper[(method, b)]:.2f} (paper)" if (method, b) in paper else "–" for b in budgets
                    )
                    + " |"
                )
    lines += [
        "",
        "Best: the highest val mIoU over a run's epochs; final: its last epoch's. std: the sample "
        "standard deviation over seeds (n - 1); the number in brackets is the number of seeds.",
    ]
    if paper:
        lines.append(f"Rows marked (paper): {'; '.join(sources)}.")
    every_seed = {seed for s in stats.values() for seed in s.seeds}
    lacking = [
        f"{method} at {budget} lacks {' '.join(map(str, sorted(every_seed - set(s.seeds))))}"
        for (method, budget), s in sorted(
            stats.items(), key=lambda kv: (method_order(kv[0][0]), budgets.index(kv[0][1]))
        )
        if set(s.seeds) != every_seed
    ]
    if lacking:
        lines += ["", f"Seeds missing (these cells' means are over fewer seeds): {'; '.join(lacking)}."]
    if left_out:
        lines += [
            "",
            "Left out, unfinished: "
            + ", ".join(f"{r.source} ({len(r.test_miou)} epochs logged)" for r in left_out),
        ]
    return "\n".join(lines + ["", "![val mIoU against labels](report.png)", ""])


def csv_text(stats: dict, paper: dict) -> str:
    """report.csv: one row per (source, method, budget), mIoU in percent."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["source", "method", "budget", "n", "best_mean", "best_std", "final_mean", "final_std", "seeds"]
    )
    budgets = budget_columns(stats)
    for (method, budget), s in sorted(
        stats.items(), key=lambda kv: (method_order(kv[0][0]), budgets.index(kv[0][1]))
    ):
        numbers = [
            f"{v:.4f}" if v == v else "" for v in (*s.best, *s.final)
        ]  # v != v: NaN, the std of one seed
        writer.writerow(["ours", method, budget, len(s.seeds), *numbers, " ".join(map(str, s.seeds))])
    for (method, budget), value in paper.items():
        writer.writerow(["paper", method, budget, 1, f"{value:.2f}", "", "", "", ""])
    return buffer.getvalue()


def plot(stats: dict, paper: dict, out: Path) -> None:
    """report.png: best val mIoU (mean ± std over seeds) against the label budget, one line per method."""
    methods = sorted({m for m, _ in stats} | {m for m, _ in paper}, key=method_order)
    budgets = budget_columns(stats)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(methods):
        colour = f"C{i}"
        shift = 0.04 * (i - (len(methods) - 1) / 2)  # side by side, so error bars do not hide each other
        xs = [j for j, b in enumerate(budgets) if (method, b) in stats]
        if xs:
            means = [stats[(method, budgets[j])].best[0] for j in xs]
            stds = [np.nan_to_num(stats[(method, budgets[j])].best[1]) for j in xs]
            ax.errorbar(
                np.add(xs, shift), means, yerr=stds, color=colour, marker="o", capsize=3, label=method
            )
        for j, b in enumerate(budgets):
            if (method, b) in paper:
                ax.scatter(
                    j + shift, paper[(method, b)], color=colour, marker="*", s=90, label=f"{method} (paper)"
                )
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel(budget_kind(budgets))
    ax.set_ylabel("best val mIoU (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=120), out)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    """study.py report: report.md, report.csv and report.png of the runs in the folders."""
    folders = [Path(f) for f in args.folders]
    found = [run_log(record) for record in find_runs(folders)]
    runs = [r for r in found if r.finished]
    if not runs:
        raise UserError(
            f"no finished run in {', '.join(map(str, folders))} (a run folder holds {CONFIG}, or "
            f"a log folder {{run}}{LOG_SUFFIX}); {len(found)} unfinished"
        )
    check_comparable(runs)
    stats = cell_stats(runs)
    paper, sources = paper_numbers(args.paper, runs)
    out = Path(args.out or folders[0])
    left_out = [r for r in found if not r.finished]
    text = markdown(stats, paper, runs, left_out, folders, sources)
    atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), out / "report.md")
    atomic_save(lambda tmp: tmp.write_text(csv_text(stats, paper), encoding="utf-8"), out / "report.csv")
    plot(stats, paper, out / "report.png")
    unfinished = f", {len(left_out)} unfinished left out" if left_out else ""
    print(
        f"{len(runs)} runs ({len(stats)} method x budget cells{unfinished}) -> {out / 'report.md'}, "
        "report.csv, report.png"
    )


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    """study.py run | report."""
    p = argparse.ArgumentParser(
        description="Studies: a grid of training runs, and the paper-style table of them"
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run (or list) every cell of a methods x budgets x seeds grid",
        description="Training flags shared by every cell follow a lone --.",
    )
    run.add_argument(
        "--out", required=True, help="the study folder (cells/<method>/<budget>/seed<k>/ inside)"
    )
    run.add_argument(
        "--script",
        choices=sorted(set(MODE_SCRIPTS.values())),
        help="the semi-supervised script (default: by the budget kind); 'sup' runs its supervised twin",
    )
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    budgets = run.add_mutually_exclusive_group(required=True)
    budgets.add_argument("--num_labels", type=int, nargs="+", help="label budgets (labelled images)")
    budgets.add_argument("--split_dirs", nargs="+", help="split folders (labelled.txt, unlabelled.txt)")
    budgets.add_argument(
        "--splits", nargs="+", help="shipped splits by name, e.g. pascal/92 (the scripts' --split)"
    )
    budgets.add_argument("--partial", nargs="+", help="partial-label settings (p0 p1 p5 p25)")
    run.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="sup, cutout, cutmix, classmix (the mean teacher's mixing), fixmatch, unimatch, "
        "each optionally +reco (e.g. classmix+reco, unimatch+reco)",
    )
    run.add_argument(
        "--gpus", nargs="+", help="run one cell per GPU at a time (CUDA_VISIBLE_DEVICES of each)"
    )
    run.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the command line of each cell still to run, one a line, and run nothing",
    )
    rep = sub.add_parser("report", help="report.md, report.csv and report.png of a study or of run folders")
    rep.add_argument(
        "folders", nargs="+", help="a study folder, or any folders holding runs (searched recursively)"
    )
    rep.add_argument("--out", help="where the report goes (default: the first folder)")
    rep.add_argument(
        "--paper",
        choices=sorted(PAPER),
        help="add the published mIoU at the runs' budgets: the reference ReCo README's, and "
        "UniMatch's on Pascal's classic splits (--splits pascal/92 ...)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: training flags for the cells follow a lone '--'."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = get_args_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "run":
        run_study(args, extra)
    else:
        report(args)


if __name__ == "__main__":
    run_cli(main)

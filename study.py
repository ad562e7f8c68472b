"""Studies: a grid of ordinary training runs (methods x label budgets x seeds) and its paper-style report
(study_report.py). This file: the command line, and running the grid.

python study.py run --out DIR --seeds 0 1 2 --num_labels 60 200 \
    --methods sup classmix classmix+reco [-- flags]
python study.py report DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dataset_table import PARTIAL_SETTINGS
from faults import STOP_SIGNALS, exit_code, stop_signals_to_catch
from helpers import UserError, run_cli, write_json
from module_list import ONLINE_METHODS
from run_folder import LAST, MODE_SCRIPTS, RunFiles
from splits import read_split_dir, shipped_splits
from study_report import PAPER, parse_method, report

REPO = Path(__file__).resolve().parent
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


# ---------------------------------------------------------------------------------------------
# study.py run: the grid's cells, their states and commands, one subprocess each
# ---------------------------------------------------------------------------------------------


def script_of(semi: bool, partial: bool) -> str:
    """The training script of a cell: supervised or semi-supervised, on full or partial labels."""
    return MODE_SCRIPTS[("semi" if semi else "sup") + ("_partial" if partial else "")]


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
    previous = {signum: signal.signal(signum, processes.stop) for signum in stop_signals_to_catch()}
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
        "--baseline",
        nargs="+",
        metavar="FOLDER",
        help="folders of supervised runs at other flags (e.g. a study of --methods sup at --batch_size 2, "
        "the semi-supervised step's labelled crops): adds each method's gain over them, seed by seed",
    )
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

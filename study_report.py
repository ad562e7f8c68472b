"""study.py report: the runs found in folders -> mean +- std of val mIoU per method x label budget, beside
the published numbers (report.md, report.csv, report.png); the study's method names."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dataset_table import ONLINE_DEFAULTED, PARTIAL_SETTINGS  # noqa: E402
from helpers import UserError, atomic_save  # noqa: E402
from module_list import MIX_MODES, ONLINE_METHODS  # noqa: E402
from run_folder import CONFIG, LOG_SUFFIX, RunRecord, find_runs  # noqa: E402

# sup, the mean teacher by its mixing, then FixMatch and UniMatch (train_semisup.py --method)
METHOD_BASES = ("sup", *MIX_MODES, *ONLINE_METHODS)
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


def parse_method(method: str) -> tuple[str, bool]:
    """'classmix+reco' -> ('classmix', True); a UserError naming --methods for anything else."""
    base, plus, reco = method.partition("+")
    if base not in METHOD_BASES or (plus and reco != "reco"):
        raise UserError(
            f"--methods: unknown method {method!r}; use {', '.join(METHOD_BASES)}, each optionally "
            "with +reco (e.g. classmix+reco, unimatch+reco)"
        )
    return base, bool(plus)


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
    repeatable: bool | None = None  # RunRecord.repeatable
    threads: int | None = None


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
    return RunLog(
        record.source,
        method,
        budget,
        labels,
        int(args["seed"]),
        compared,
        dataset,
        miou,
        finished,
        record.repeatable,
        record.threads,
    )


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


@dataclass
class Gain:
    """A method's best val mIoU minus sup's on the same seeds (points): mean, sample std, seeds, wins."""

    mean: float
    std: float
    n: int
    wins: int


def gains_over_sup(
    runs: Sequence[RunLog], baseline: Sequence[RunLog] | None = None
) -> dict[tuple[str, str], Gain]:
    """(method, budget) -> Gain over the supervised run of the same budget and seed: the study's own, or
    (every method, sup too) that in `baseline`. A seed draws the same labelled images for every method, so
    the differences leave the split's luck out of the spread."""
    best = {(r.method, r.budget, r.seed): 100 * float(r.test_miou.max()) for r in runs}
    base = {(r.budget, r.seed): 100 * float(r.test_miou.max()) for r in baseline or runs if r.method == "sup"}
    paired: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (method, budget, seed), value in sorted(best.items()):
        if (method != "sup" or baseline is not None) and (budget, seed) in base:
            paired[(method, budget)].append(value - base[(budget, seed)])
    return {
        key: Gain(
            float(np.mean(d)),
            float(np.std(d, ddof=1)) if len(d) > 1 else float("nan"),
            len(d),
            sum(x > 0 for x in d),
        )
        for key, d in paired.items()
    }


def flag_text(key: str, value) -> str:
    """A configuration entry as it reads on a command line: --key, --key v or --key v1 v2."""
    if value is True:
        return f"--{key}"
    return f"--{key} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))


def cell_text(mean: float, std: float, n: int) -> str:
    """'45.12 ± 1.03 (3)': mean ± std (n seeds) in percent."""
    return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} (1)"


def table_head(title: str, columns: Sequence[str]) -> list[str]:
    """The markdown lines that open a section's method-by-column table."""
    header = "| method | " + " | ".join(columns) + " |"
    return ["", f"## {title}", "", header, "|---" * (len(columns) + 1) + "|"]


def gain_text(gain: Gain) -> str:
    """'+5.76 ± 5.36 (3, better on 3)'."""
    spread = f" ± {gain.std:.2f}" if gain.n > 1 else ""
    return f"{gain.mean:+.2f}{spread} ({gain.n}, better on {gain.wins})"


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


def repeatability_line(runs: Sequence[RunLog]) -> str:
    """Which runs the same command repeats to the bit on their machine (CPU runs and --deterministic GPU
    runs), and the CPU threads they ran with (a different count gives a different run)."""
    cells = {
        flag: [f"{r.method} {r.budget} seed {r.seed}" for r in runs if r.repeatable is flag]
        for flag in (False, None)
    }
    repeatable = sum(r.repeatable is True for r in runs)
    parts = [f"Repeatable to the bit on their machine: {repeatable} of {len(runs)} runs"]
    if cells[False]:
        parts.append(f"not (GPU without --deterministic): {', '.join(cells[False])}")
    if cells[None]:
        parts.append(f"not recorded (older runs): {', '.join(cells[None])}")
    threads = sorted({r.threads for r in runs if r.threads is not None})
    if threads:
        differ = " (they differ)" if len(threads) > 1 else ""
        parts.append(f"CPU threads: {', '.join(map(str, threads))}{differ}")
    return "; ".join(parts) + "."


@dataclass
class Baseline:
    """study.py report --baseline: a folder's supervised runs and the flags in which they differ from the
    study's supervised runs (without those, from its first method's: the flags that follow --method are
    left out when that is FixMatch or UniMatch)."""

    folder: Path
    runs: list[RunLog]
    differ: str


def read_baseline(folder: Path, runs: Sequence[RunLog]) -> Baseline:
    """The finished supervised runs in folder, comparable among themselves; a UserError naming --baseline
    for a folder without any."""
    found = [r for r in map(run_log, find_runs([folder])) if r.finished and r.method == "sup"]
    if not found:
        raise UserError(
            f"--baseline {folder}: no finished supervised run in it; give a study of --methods sup"
        )
    check_comparable(found)
    if {r.dataset for r in found} != {r.dataset for r in runs}:
        raise UserError(
            f"--baseline {folder}: its runs are on {found[0].dataset}, the study's on {runs[0].dataset}; "
            "a baseline must train on the same data"
        )
    reference = min(runs, key=lambda r: method_order(r.method))
    skip = ONLINE_DEFAULTED if parse_method(reference.method)[0] in ONLINE_METHODS else ()
    ours, theirs = reference.config or {}, found[0].config or {}
    differ = [
        flag_text(key, theirs.get(key)) + ("" if key in ours else " (unrecorded here)")
        for key in sorted(set(ours) | set(theirs))
        if " " not in key and key not in skip and theirs.get(key) != ours.get(key)
    ]
    return Baseline(folder, found, " ".join(differ) or "the same flags")


def markdown(
    stats: dict,
    paper: dict,
    runs: Sequence[RunLog],
    left_out: Sequence[RunLog],
    folders: Sequence[Path],
    sources: Sequence[str] = (),
    baselines: Sequence[Baseline] = (),
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
        lines += ["", repeatability_line(runs)]
    else:
        lines += ["", f"Some runs have no {CONFIG}: they were grouped by their file names only."]
    for title, field in (("Best", "best"), ("Final", "final")):
        lines += table_head(f"{title} val mIoU (%), mean ± std (seeds), columns: {kind}", budgets)
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
    tables = [("Gain over sup on the same labelled images", gains_over_sup(runs))] + [
        (f"Gain over sup in {b.folder}, which ran at {b.differ}", gains_over_sup(runs, b.runs))
        for b in baselines
    ]
    for title, gains in [(title, gains) for title, gains in tables if gains]:
        paired = [b for b in budgets if any(key[1] == b for key in gains)]
        lines += table_head(f"{title} (best val mIoU, points), columns: {kind}", paired)
        for method in sorted({m for m, _ in gains}, key=method_order):
            row = [gain_text(gains[(method, b)]) if (method, b) in gains else "–" for b in paired]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    if any(gains for _, gains in tables):
        lines += [
            "",
            "Each seed draws the same labelled images for every method: a gain is a method's run minus sup's "
            "on that seed, mean ± std over seeds (n, and on how many seeds the method was better).",
        ]
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
    baselines = [read_baseline(Path(folder), runs) for folder in args.baseline or []]
    out = Path(args.out or folders[0])
    left_out = [r for r in found if not r.finished]
    text = markdown(stats, paper, runs, left_out, folders, sources, baselines)
    atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), out / "report.md")
    atomic_save(lambda tmp: tmp.write_text(csv_text(stats, paper), encoding="utf-8"), out / "report.csv")
    plot(stats, paper, out / "report.png")
    unfinished = f", {len(left_out)} unfinished left out" if left_out else ""
    print(
        f"{len(runs)} runs ({len(stats)} method x budget cells{unfinished}) -> {out / 'report.md'}, "
        "report.csv, report.png"
    )

"""A training run's name and files: where each goes, its format, writing it (the engine) and reading it back
(study.py, predict.py, evaluate.py). The reference's two files, and our run folder beside them:

    <weights_dir>/<name>.pth   the best weights (a plain state_dict)
    <log_dir>/<name>.npy       the metric array [epochs, metric_columns]; a row is zero until its epoch ends
    <log_dir>/<name>/          config.json and split/ (at the start); last.pth, metrics.csv, curves.png and
                               tensorboard/ (each epoch); visual.png and summary.json (at the end)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from dataset_table import FOLDER
from helpers import UserError, atomic_save, save_file, write_json
from module_list import MIX_MODES, ONLINE_METHODS
from splits import split_digest, write_split_dir
from transforms import HUE_JITTER

CONFIG = "config.json"  # the resolved configuration ({"args": {...}, ...}), written at the start
SUMMARY = "summary.json"  # the outcome, written at the end
LAST = "last.pth"  # the resume checkpoint (engine.save_last's dict)
SPLIT = "split"  # the split trained on: labelled.txt and unlabelled.txt (splits.write_split_dir)
LOG_SUFFIX = ".npy"
MODE_SCRIPTS = {
    "sup": "train_sup.py",
    "semi": "train_semisup.py",
    "sup_partial": "train_sup_partial.py",
    "semi_partial": "train_semisup_partial.py",
}
PATH_FLAGS = ("data_root", "split_dir")  # recorded absolute, so a report can tell two data folders apart
# The run name (run_name), read back for a run that has no config.json: one made before there was one, or the
# reference's .npy log.
_RUN_NAME = re.compile(
    r"(?P<dataset>.+)_(?:label(?P<labels>\d+)|(?P<partial>p\d+))_"
    r"(?:sup|semi_(?P<aug>"
    + "|".join(MIX_MODES)
    + r")|(?P<method>"
    + "|".join(ONLINE_METHODS)
    + r"))(?P<reco>_reco)?_(?P<seed>\d+)"
)
# The test metrics close every row of the metric array, whatever the step logged before them.
TEST_COLUMNS = ("test_loss", "test_miou", "test_acc")


# ---------------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------------


def dataset_tag(dataset: str, data_root: str | None) -> str:
    """The dataset in a run name: a built-in's name, or a folder dataset's folder name (in letters, digits,
    '.' and '-') and 6 hex digits of its absolute path: two folders, even of one name, never share a run
    folder."""
    if dataset != FOLDER:
        return dataset
    path = Path(data_root).resolve()
    name = re.sub(r"[^\w.-]+|_", "-", path.name).strip("-.") or "data"  # '_' separates the name's parts
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def run_name(args: argparse.Namespace, semi: bool) -> str:
    """The reference's file stem: {dataset}_label{N}|{partial}_{sup|semi_{aug}}[_reco]_{seed}, where a folder
    dataset's {dataset} is dataset_tag's; FixMatch and UniMatch (--method) put their name in place of
    semi_{aug}."""
    dataset = dataset_tag(args.dataset, args.data_root)
    head = f"{dataset}_{args.partial}" if args.partial else f"{dataset}_label{args.num_labels}"
    kind = (args.method if args.method in ONLINE_METHODS else f"semi_{args.apply_aug}") if semi else "sup"
    return f"{head}_{kind}{'_reco' if args.apply_reco else ''}_{args.seed}"


def flags_of_name(name: str) -> tuple[dict, bool] | None:
    """(the flags a run name records: dataset, num_labels, partial, apply_aug or method, apply_reco, seed;
    semi-supervised?), or None for a name run_name does not make."""
    match = _RUN_NAME.fullmatch(name)
    if not match:
        return None
    flags = {
        "dataset": match["dataset"],
        "num_labels": int(match["labels"] or 0),
        "partial": match["partial"],
        "apply_aug": match["aug"],
        "method": match["method"],
        "apply_reco": bool(match["reco"]),
        "seed": int(match["seed"]),
    }
    return flags, match["aug"] is not None or match["method"] is not None


def metric_columns(semi: bool, terms: Sequence[str] = ("sup", "unsup", "reco")) -> tuple[str, ...]:
    """Columns of the reference's per-epoch .npy metric array: a semi-supervised step's logged terms (the mean
    teacher's by default; '<term>_loss', a ratio under its own name), then its monitors and the test
    metrics."""
    if semi:
        logged = tuple(term if term.endswith("_ratio") else f"{term}_loss" for term in terms)
        return logged + ("labelled_miou", "labelled_acc", "unlabelled_miou", "unlabelled_acc", *TEST_COLUMNS)
    return ("train_loss", "train_miou", "train_acc", *TEST_COLUMNS)


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run: its folder, the .npy log beside it and (when known) its best weights."""

    folder: Path
    weights: Path | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunFiles:
        """The files of the run that resolved flags describe (args.name, --log_dir, --weights_dir)."""
        return cls(Path(args.log_dir) / args.name, Path(args.weights_dir) / f"{args.name}.pth")

    @property
    def npy(self) -> Path:
        """The reference's metric array [epochs, metric_columns], beside the folder."""
        return self.folder.parent / f"{self.folder.name}{LOG_SUFFIX}"

    @property
    def config(self) -> Path:
        """The resolved configuration (run_config), written at the start."""
        return self.folder / CONFIG

    @property
    def summary(self) -> Path:
        """The outcome (summarise), written at the end."""
        return self.folder / SUMMARY

    @property
    def last(self) -> Path:
        """The resume checkpoint, replaced after each epoch (and every --save_every iterations)."""
        return self.folder / LAST

    @property
    def metrics_csv(self) -> Path:
        """The metric array's finished epochs as CSV: epoch, then metric_columns."""
        return self.folder / "metrics.csv"

    @property
    def curves(self) -> Path:
        """The metrics against epochs (figures.plot_curves), drawn after each epoch."""
        return self.folder / "curves.png"

    @property
    def visual(self) -> Path:
        """The best weights' predictions on val images (figures.draw_comparison), drawn at the end."""
        return self.folder / "visual.png"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files: each metric and the learning rate at step epoch + 1."""
        return self.folder / "tensorboard"

    @property
    def split(self) -> Path:
        """The split trained on (SPLIT)."""
        return self.folder / SPLIT

    def finished(self) -> bool:
        """Whether the run ended: its summary is written, or every epoch of its .npy log is filled (a run
        stopped between its last epoch and its summary, or one made before summaries)."""
        return self.summary.is_file() or read_metrics(self.npy)[1]


# ---------------------------------------------------------------------------------------------
# Writing (rank 0 of a training run)
# ---------------------------------------------------------------------------------------------


def _json_value(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_config(
    args: argparse.Namespace,
    labelled: Sequence[str],
    unlabelled: Sequence[str],
    device: torch.device | str,
    world_size: int,
) -> dict:
    """config.json: every resolved flag, the split's digest, torch/torchvision versions, device, world size,
    mode and script, CPU threads and whether deterministic kernels were enforced (docs/reproducibility.md)."""
    flags = {name: _json_value(value) for name, value in sorted(vars(args).items())}
    for name in PATH_FLAGS:
        if flags.get(name) is not None:
            flags[name] = str(Path(flags[name]).resolve())
    return {
        "args": flags,
        "split_digest": split_digest(labelled, unlabelled),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "world_size": world_size,
        "mode": args.train_mode,
        "script": MODE_SCRIPTS[args.train_mode],
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def summarise(
    metrics: np.ndarray, columns: Sequence[str], wall_s: float, files: RunFiles, figures: Sequence[Path]
) -> dict:
    """summary.json from the finished metric array [epochs, columns] (epochs 1-based, paths absolute)."""
    miou = metrics[:, list(columns).index("test_miou")]
    best = len(miou) - 1 - int(np.argmax(miou[::-1]))  # the saved weights: the last epoch reaching the best
    return {
        "best_miou": float(miou[best]),
        "best_epoch": best + 1,
        "final_miou": float(miou[-1]),
        "final_epoch": len(miou),
        "epochs": len(miou),
        "wall_s": round(wall_s, 1),
        "weights": str(files.weights.resolve()),
        "npy": str(files.npy.resolve()),
        "run_dir": str(files.folder.resolve()),
        "figures": [str(f.resolve()) for f in figures],
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_summary(name: str, summary: dict) -> str:
    """The lines a finished run prints: best and final val mIoU, wall time, and where its files went."""
    folder = summary["run_dir"]
    files = ", ".join(
        sorted(p.name + "/" * p.is_dir() for p in Path(folder).iterdir() if not p.name.startswith("."))
    )
    return "\n".join(
        [
            f"{name} finished in {_duration(summary['wall_s'])}: best val mIoU {summary['best_miou']:.4f} "
            f"(epoch {summary['best_epoch']}), final {summary['final_miou']:.4f} "
            f"(epoch {summary['final_epoch']} "
            f"of {summary['epochs']})",
            f"  weights  {summary['weights']}  (epoch {summary['best_epoch']})",
            f"  log      {summary['npy']}",
            f"  run      {folder}/  ({files})",
            *[f"  figure   {f}" for f in summary["figures"]],
        ]
    )


def supervised_twin(config: dict, log_dir: Path) -> tuple[Path, dict] | None:
    """(folder, summary) of a finished supervised run in log_dir on the same dataset, data and split as the
    run of `config` (its labelled and unlabelled lists, by their digest), the newest if several."""
    found = []
    for path in log_dir.glob(f"*/{CONFIG}"):
        other, summary = read_config(path.parent), read_summary(path.parent)
        if (
            other
            and summary
            and other.get("mode", "").startswith("sup")
            and other.get("split_digest") == config["split_digest"]
            and all(other["args"].get(flag) == config["args"].get(flag) for flag in ("dataset", *PATH_FLAGS))
        ):
            found.append((path.stat().st_mtime, path.parent, summary))
    return max(found, key=lambda item: item[0])[1:] if found else None


# Flags added after runs were first recorded, with the value the runs that lack them trained at.
UNRECORDED = {"reco_weight": 1.0, "hue_jitter": HUE_JITTER}

# The flags that make two runs' numbers comparable beyond their data and split: the network and its schedule.
MATCHED_FLAGS = (
    "backbone",
    "resnet_depth",
    "pretrained",
    "lr",
    "epochs",
    "iters_per_epoch",
    "crop_size",
    "hue_jitter",
)


def labelled_batch(batch_size: int, semi: bool) -> int:
    """Labelled crops a step takes per process: the supervised scripts take twice --batch_size, as the
    reference does, to see as many images a step as the semi-supervised step's labelled + unlabelled."""
    return batch_size if semi else 2 * batch_size


def labelled_crops(config: dict) -> int:
    """Labelled crops a recorded run's optimiser step took over all processes."""
    semi = config["mode"].startswith("semi")
    return labelled_batch(config["args"]["batch_size"], semi) * config.get("world_size", 1)


def baseline_line(config: dict, best_miou: float, log_dir: Path) -> str:
    """A semi-supervised run's last line: its gain over the supervised run on the same labelled images, the
    training flags on which the two differ (the gain is then not the unlabelled images' alone) and the
    labelled crops a step of each where they differ; or the command that measures it."""
    twin = supervised_twin(config, log_dir)
    if twin:
        folder, summary = twin
        alone = summary["best_miou"]
        gain = f"{best_miou - alone:+.4f} best val mIoU"
        line = f"  vs sup   {gain} over the same labelled images alone ({alone:.4f}, {folder}/)"
        their_config = read_config(folder)
        theirs, ours = (UNRECORDED | c["args"] for c in (their_config, config))
        differ = [
            f"--{f} {_flag_text(theirs.get(f))} there" for f in MATCHED_FLAGS if theirs.get(f) != ours.get(f)
        ]
        line += "; not matched: " + ", ".join(differ) if differ else ""
        crops = labelled_crops(their_config), labelled_crops(config)
        if crops[0] != crops[1]:
            line += "; labelled crops a step: {} there, {} here".format(*crops)
            batch, odd = divmod(crops[1], labelled_batch(1, semi=False) * their_config.get("world_size", 1))
            line += f" (--batch_size {batch} there would match them)" if batch and not odd else ""
        return line
    script = MODE_SCRIPTS[config["mode"].replace("semi", "sup")]
    return (
        f"  vs sup   not measured: `python {script}` with the same --dataset, --data_root, label flags "
        "and --seed trains on the labelled images alone; this line then gives the gain"
    )


def _flag_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class RunWriter:
    """Rank 0's writer of a run's files, each replaced atomically; the figures are drawn by the caller at
    files.curves and files.visual."""

    def __init__(self, args: argparse.Namespace, columns: Sequence[str], start_epoch: int):
        self.args, self.columns = args, tuple(columns)
        self.files = RunFiles.of(args)
        for folder in (self.files.weights.parent, self.files.folder):
            folder.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # rank 0 only, and only once outputs exist

        # epoch e is logged at step e + 1: a resumed run rewrites steps from start_epoch + 1 on
        self.tb = SummaryWriter(str(self.files.tensorboard), purge_step=start_epoch + 1)

    def write_start(
        self, labelled: Sequence[str], unlabelled: Sequence[str], device: torch.device, world_size: int
    ) -> None:
        """The split folder, and config.json: resolved flags, split digest, versions, device, world size."""
        write_split_dir(self.files.split, labelled, unlabelled)
        self.config = run_config(self.args, labelled, unlabelled, device, world_size)
        write_json(self.files.config, self.config)

    def write_epoch(
        self, epoch: int, lr: float, metrics: np.ndarray, model: nn.Module, is_best: bool
    ) -> None:
        """Everything that changes after an epoch: best weights, .npy, metrics.csv and TensorBoard scalars."""
        if is_best:
            save_file(lambda file: torch.save(model.state_dict(), file), self.files.weights)
        save_file(lambda file: np.save(file, metrics), self.files.npy)
        rows = [",".join(("epoch",) + self.columns)]
        rows += [",".join([str(e + 1)] + [f"{v:.6g}" for v in metrics[e]]) for e in range(epoch + 1)]
        text = "\n".join(rows) + "\n"
        atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), self.files.metrics_csv)
        for name, value in zip(self.columns, metrics[epoch]):
            self.tb.add_scalar(name, value, epoch + 1)
        self.tb.add_scalar("lr", lr, epoch + 1)
        self.tb.flush()

    def write_summary(self, metrics: np.ndarray, wall_s: float) -> dict:
        """summary.json of the finished run, also printed; returns it."""
        figures = [f for f in (self.files.curves, self.files.visual) if f.is_file()]
        summary = summarise(metrics, self.columns, wall_s, self.files, figures)
        write_json(self.files.summary, summary)
        lines = [format_summary(self.args.name, summary)]
        if self.config["mode"].startswith("semi"):
            lines.append(baseline_line(self.config, summary["best_miou"], self.files.folder.parent))
        print("\n".join(lines), flush=True)
        return summary

    def close(self) -> None:
        """Flush and close the TensorBoard event file."""
        self.tb.close()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what} {path} cannot be read ({error}); delete it or restore it") from None


def read_config(folder: str | os.PathLike) -> dict | None:
    """folder's config.json; None if there is none or it is not a training run's (another tool's config.json);
    a UserError if it cannot be read."""
    path = Path(folder) / CONFIG
    config = _read_json(path, "run configuration") if path.is_file() else None
    return config if isinstance(config, dict) and isinstance(config.get("args"), dict) else None


def read_summary(folder: str | os.PathLike) -> dict | None:
    """folder's summary.json (None: the run has not finished); a UserError if it cannot be read."""
    path = Path(folder) / SUMMARY
    summary = _read_json(path, "run summary") if path.is_file() else None
    return summary if isinstance(summary, dict) else None


def read_metrics(npy: Path) -> tuple[np.ndarray, bool]:
    """(the filled rows of a .npy metric array, whether every epoch is filled); (empty, False) without one."""
    if not npy.is_file():
        return np.zeros((0, 0)), False
    metrics = np.load(npy)
    filled = int(np.flatnonzero(np.abs(metrics).sum(axis=1))[-1]) + 1 if metrics.any() else 0
    return metrics[:filled], len(metrics) > 0 and filled == len(metrics)


@dataclass(frozen=True)
class RunRecord:
    """A run read back from disk: from its config.json, or (no config.json) from its .npy log's name."""

    source: Path  # the run folder (with config.json) or the .npy log (without)
    args: dict  # its resolved flags; from a name only those flags_of_name gives
    semi: bool
    npy: Path
    world_size: int | None  # None: a run known by its name only
    # Whether the same command repeats it to the bit on its machine (a CPU run, or --deterministic), and its
    # CPU threads (part of the result); None: its config.json predates these records
    repeatable: bool | None = None
    threads: int | None = None

    def val_miou(self) -> tuple[np.ndarray, bool]:
        """(val mIoU of each filled epoch, whether every epoch is filled)."""
        metrics, finished = read_metrics(self.npy)
        column = TEST_COLUMNS.index("test_miou") - len(TEST_COLUMNS)  # the step's own columns come first
        return (metrics[:, column] if len(metrics) else np.zeros(0)), finished


def record_of_folder(folder: Path) -> RunRecord | None:
    """The run of a run folder, read from its config.json (None: it has no training run's config.json)."""
    config = read_config(folder)
    if config is None or "mode" not in config:
        return None
    files = RunFiles(folder.parent / config["args"].get("name", folder.name))  # as training named them
    summary = read_summary(folder)
    npy = Path(summary["npy"]) if summary and "npy" in summary else files.npy
    if not npy.is_file():  # the folder may have moved: the log lies beside it, as training wrote it
        npy = files.npy
    semi = config["mode"].startswith("semi")  # the modes are sup and semi, each also _partial (MODE_SCRIPTS)
    recorded = "threads" in config
    repeatable = (config["deterministic"] or str(config["device"]).startswith("cpu")) if recorded else None
    return RunRecord(
        folder, config["args"], semi, npy, config.get("world_size", 1), repeatable, config.get("threads")
    )


def record_of_log(npy: Path) -> RunRecord | None:
    """A run known only by its .npy log, read from the log's name (None: another kind of .npy)."""
    found = flags_of_name(npy.stem)
    if found is None:
        return None
    flags, semi = found
    return RunRecord(npy, flags, semi, npy, None)


def find_runs(folders: Iterable[Path]) -> list[RunRecord]:
    """Every run under the folders (searched recursively): run folders by their config.json, other runs by
    their .npy log's name."""
    folders = list(folders)
    runs: dict[Path, RunRecord] = {}
    logs_of_folders: set[Path] = set()
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; pass a study folder or run folders")
        for path in sorted(folder.rglob(CONFIG)):
            record = record_of_folder(path.parent)
            if record:
                runs[record.source.resolve()] = record
                logs_of_folders.add(record.npy.resolve())
    for folder in folders:
        for npy in sorted(folder.rglob(f"*{LOG_SUFFIX}")):
            if npy.resolve() not in logs_of_folders and (record := record_of_log(npy)):
                runs[npy.resolve()] = record
    return list(runs.values())


def checkpoint_config(checkpoint: Path) -> tuple[Path, dict] | None:
    """(config.json path, config) of the run a checkpoint came from: beside it (a last.pth), or in the run
    folder logging/<stem>/ from here or beside the checkpoint's folder (model_weights/ and logging/ are
    siblings)."""
    candidates = [
        checkpoint.parent,
        Path("logging") / checkpoint.stem,
        checkpoint.parent.parent / "logging" / checkpoint.stem,
    ]
    for folder in candidates:
        config = read_config(folder)
        if config is not None:
            return folder / CONFIG, config
    return None


def checkpoint_split(checkpoint: Path) -> Path | None:
    """The split folder of the run a checkpoint came from (None: no run folder, or one from before splits
    were recorded)."""
    found = checkpoint_config(checkpoint)
    return found[0].parent / SPLIT if found and (found[0].parent / SPLIT).is_dir() else None


def checkpoint_dataset(
    dataset: str | None, data_root: str | None, checkpoint: Path, hint: str = ""
) -> tuple[str, str | None, Path | None]:
    """(--dataset, --data_root, None) as given, else as the checkpoint's run recorded them, with its
    config.json; a UserError naming --dataset (and `hint`) when neither says."""
    if dataset is not None:
        return dataset, data_root, None
    found = checkpoint_config(checkpoint)
    if found is None:
        raise UserError(
            f"no run configuration ({CONFIG}) found for checkpoint {checkpoint} (beside it "
            f"or in logging/{checkpoint.stem}/): pass --dataset NAME [--data_root DIR], the "
            f"dataset it was trained on{hint}"
        )
    path, config = found
    dataset = config["args"].get("dataset")
    if not isinstance(dataset, str):
        raise UserError(f"run configuration {path} names no dataset: pass --dataset NAME [--data_root DIR]")
    return dataset, data_root or config["args"].get("data_root"), path

"""The card of a dataset described by its folder: classes.txt (one class a line: its name, optionally followed
by R G B) and the optional dataset.json that overrides the training defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import DataError

CLASSES_FILE = "classes.txt"
OVERRIDES_FILE = "dataset.json"
HELP = "docs/own_data.md"


@dataclass(frozen=True)
class DatasetCard:
    """What classes.txt and dataset.json say; sizes are (H, W). Defaults are those of a silent folder."""

    class_names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...] | None  # None: classes.txt gives no colours
    void: int = 255  # label value of unlabelled pixels
    crop_size: tuple[int, int] = (321, 321)
    eval_size: tuple[int, int] | None = None  # None: the largest validation image, so no image is cut
    scale_range: tuple[float, float] = (0.5, 1.5)
    batch_size: int = 10
    min_classes: int = 2  # classes a labelled image must hold to be picked by the split sampler
    epochs: int = 200
    iters_per_epoch: int = 200
    resnet_depth: int = 101
    pretrained: str = "imagenet"
    # None: the reference's (transforms.HUE_JITTER); 0 when colour tells the classes apart
    hue_jitter: float | None = None


def _size(key: str, value: Any, path: Path) -> tuple[int, int]:
    """A size given as N or [H, W] of positive integers."""
    pair = [value, value] if isinstance(value, int) else value
    if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int and v > 0 for v in pair)):
        raise DataError(f"{path}: {key!r} must be a positive integer or [H, W], got {value!r}")
    return pair[0], pair[1]


def _scale_range(key: str, value: Any, path: Path) -> tuple[float, float]:
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
        and 0 < value[0] <= value[1]
    ):
        raise DataError(
            f"{path}: {key!r} must be [low, high] with 0 < low <= high (e.g. [0.5, 1.5]), got {value!r}"
        )
    return float(value[0]), float(value[1])


def _positive(key: str, value: Any, path: Path) -> int:
    if type(value) is not int or value <= 0:
        raise DataError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def _batch_size(key: str, value: Any, path: Path) -> int:
    """A batch of at least two images: BatchNorm after the ASPP's image pooling cannot train on one."""
    if type(value) is not int or value < 2:
        raise DataError(
            f"{path}: {key!r} must be a whole number >= 2 (BatchNorm needs two images a batch), got {value!r}"
        )
    return value


def _byte(key: str, value: Any, path: Path) -> int:
    if type(value) is not int or not 0 <= value <= 255:
        raise DataError(f"{path}: {key!r} must be a label value from 0 to 255, got {value!r}")
    return value


def _hue(key: str, value: Any, path: Path) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 0.5:
        raise DataError(
            f"{path}: {key!r} must be a hue rotation in turns from 0 (none) to 0.5, got {value!r}; "
            "0 when colour tells your classes apart"
        )
    return float(value)


def _text(key: str, value: Any, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: {key!r} must be a string (imagenet, none or a file), got {value!r}")
    return value


_OVERRIDES = {
    "void": _byte,
    "crop_size": _size,
    "eval_size": _size,
    "scale_range": _scale_range,
    "batch_size": _batch_size,
    "min_classes": _positive,
    "epochs": _positive,
    "iters_per_epoch": _positive,
    "resnet_depth": _positive,
    "pretrained": _text,
    "hue_jitter": _hue,
}


def _parse_class_line(line: str, number: int, path: Path) -> tuple[str, tuple[int, int, int] | None]:
    """'name' or 'name R G B' -> (name, colour or None); a name may hold spaces and numbers ('grade 2'):
    only three whole numbers at the end are a colour."""
    words = line.split()
    if len(words) < 3 or not all(w.lstrip("-").isdigit() for w in words[-3:]):
        return " ".join(words), None
    name, colour = " ".join(words[:-3]), tuple(int(w) for w in words[-3:])
    if not name:
        raise DataError(
            f"{path} line {number}: {line.strip()!r} has a colour but no class name; write 'name R G B'"
        )
    if not all(0 <= c <= 255 for c in colour):
        raise DataError(
            f"{path} line {number}: colour {' '.join(words[-3:])} of {name!r} is out of range; "
            f"R G B are whole numbers from 0 to 255"
        )
    return name, colour


def read_classes(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None]:
    """(class names, colours or None) from classes.txt; line k (from 0) is the class of label value k."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: write one class name a line (the first line is label value 0, "
            f"e.g. 'background'), optionally followed by R G B ({HELP})"
        )
    try:  # utf-8-sig: Windows editors start UTF-8 files with a byte-order mark, not part of the first name
        lines = path.read_text(encoding="utf-8-sig").rstrip().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as UTF-8 (one class name a line)") from None
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(
                f"{path} line {number} is empty: each line names the class of one label value "
                f"(line 1 = value 0); name the class or remove the line"
            )
        parsed.append(_parse_class_line(line, number, path))
    if len(parsed) < 2:
        raise DataError(
            f"{path} lists {len(parsed)} class(es): segmentation needs at least two (e.g. "
            f"'background' and your object), one a line"
        )
    names = tuple(name for name, _ in parsed)
    seen: dict[str, int] = {}
    for value, name in enumerate(names):
        if name in seen:
            raise DataError(
                f"{path}: class name {name!r} is on lines {seen[name] + 1} and {value + 1}; "
                f"give every class its own name"
            )
        seen[name] = value
    given = [colour is not None for _, colour in parsed]
    if any(given) and not all(given):
        raise DataError(
            f"{path}: line {given.index(not given[0]) + 1} differs from line 1 in giving a colour; "
            f"give R G B on every line or on none"
        )
    colours = tuple(colour for _, colour in parsed) if all(given) else None
    return names, colours


def read_overrides(path: Path) -> dict[str, Any]:
    """The checked entries of dataset.json ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"{path} is not valid JSON ({error}); fix it or delete it to use the defaults"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(f'{path} must hold one JSON object, e.g. {{"crop_size": [321, 321]}}')
    unknown = sorted(set(raw) - set(_OVERRIDES))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(_OVERRIDES)}")
    return {key: _OVERRIDES[key](key, value, path) for key, value in raw.items()}


def read_card(root: Path) -> DatasetCard:
    """The card of the dataset folder `root`: classes.txt and dataset.json, checked against each other."""
    names, colours = read_classes(root / CLASSES_FILE)
    overrides = read_overrides(root / OVERRIDES_FILE)
    path = root / OVERRIDES_FILE
    void = overrides.get("void", DatasetCard.void)
    if not len(names) <= void <= 255:
        raise DataError(
            f"{path}: 'void' {void} must lie in {len(names)}..255 (the label values 0.."
            f"{len(names) - 1} are the classes of classes.txt): masks whose void is a class value must "
            f"be relabelled"
        )
    min_classes = overrides.get("min_classes", DatasetCard.min_classes)
    if min_classes > len(names):
        raise DataError(
            f"{path}: 'min_classes' {min_classes} is more than the {len(names)} classes of "
            f"classes.txt; lower it"
        )
    return DatasetCard(class_names=names, colours=colours, **overrides)

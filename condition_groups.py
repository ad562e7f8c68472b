"""Val mIoU by the images' recorded conditions (evaluate.py --groups): a JSON file {image id: {factor:
level}}, such as the demo's conditions.json, splits the test images by each factor's levels; with the
labelled images' ids, each level is marked by whether the labelled images show it, and each factor gets the
mIoU over the levels they show and over the levels they do not (what the unlabelled images could add)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import DataError
from module_list import ConfMatrix

SHOWN, NOT_SHOWN = "[shown]", "[not shown]"  # a factor's two summary rows, after its levels


def read_conditions(path: Path) -> dict[str, dict[str, str]]:
    """{image id: {factor: level}} from a JSON file; a DataError naming the file for anything else."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"--groups {path}: cannot read it as JSON ({e}); give a file of {{image id: {{factor: level}}}}"
        )
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise DataError(
            f"--groups {path}: expected {{image id: {{factor: level}}}}, e.g. the demo's conditions.json"
        )
    return {str(k): {str(f): str(v) for f, v in r.items()} for k, r in records.items()}


@dataclass
class Conditions:
    """The recorded conditions of the test images, in their order, and of the labelled images (None: not
    known); read before evaluating, so that a file that does not cover them fails at once."""

    test: list[dict[str, str]]
    labelled: list[dict[str, str]] | None


def read_groups(path: Path, test_ids: Sequence[str], labelled_ids: Sequence[str] | None) -> Conditions:
    """The conditions of the test (and labelled) images from --groups' file; a DataError naming the file if
    it misses any of them."""
    records = read_conditions(path)

    def levels(ids: Sequence[str], what: str) -> list[dict[str, str]]:
        missing = [i for i in ids if i not in records]
        if missing:
            raise DataError(
                f"--groups {path} has no conditions for {len(missing)} of the {len(ids)} {what} "
                f"(e.g. {missing[0]}): list every one of them"
            )
        return [records[i] for i in ids]

    return Conditions(
        levels(test_ids, "test images"),
        levels(labelled_ids, "labelled images") if labelled_ids is not None else None,
    )


def _row(per_image_conf: torch.Tensor, chosen: list[bool], shown: bool | None) -> dict:
    """The images, mIoU (over their summed confusion matrices) and shown flag of the chosen test images."""
    matrix = ConfMatrix(per_image_conf.shape[1])
    matrix.mat = per_image_conf[torch.tensor(chosen)].sum(0)
    return {"images": sum(chosen), "miou": matrix.get_metrics()[0], "shown": shown}


def group_results(conditions: Conditions, per_image_conf: torch.Tensor) -> dict[str, dict[str, dict]]:
    """{factor: {level: {images, miou, shown}}} over the test images (per_image_conf [N, C, C] in their
    order); with the labelled images' conditions also the factor's SHOWN and NOT_SHOWN rows (shown: None
    without them)."""
    test, labelled = conditions.test, conditions.labelled
    results: dict[str, dict[str, dict]] = {}
    for factor in sorted({f for r in test for f in r}):
        at = [r.get(factor, "-") for r in test]
        shown = {r.get(factor, "-") for r in labelled} if labelled is not None else None
        rows = {
            level: _row(per_image_conf, [a == level for a in at], None if shown is None else level in shown)
            for level in sorted(set(at))
        }
        for name, wanted in ((SHOWN, True), (NOT_SHOWN, False)) if shown is not None else ():
            chosen = [(a in shown) == wanted for a in at]
            if any(chosen):
                rows[name] = _row(per_image_conf, chosen, wanted)
        results[factor] = rows
    return results


def format_groups(results: dict[str, dict[str, dict]], source: str) -> str:
    """The table evaluate.py prints: one row per factor and level (* = the labelled images show it), then
    the factor's shown / not shown rows."""
    width = max([len("level"), *(len(level) + 1 for rows in results.values() for level in rows)])
    fwidth = max([len("factor"), *map(len, results)])
    lines = [f"mIoU by condition ({source})", f"{'factor':<{fwidth}}  {'level':<{width}}  images  mIoU (%)"]
    for factor, rows in results.items():
        for level, row in rows.items():
            mark = "*" if row["shown"] and level not in (SHOWN, NOT_SHOWN) else ""
            lines.append(
                f"{factor:<{fwidth}}  {level + mark:<{width}}  {row['images']:>6}  {100 * row['miou']:8.2f}"
            )
    return "\n".join(lines)

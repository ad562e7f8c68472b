"""Figures: label maps over photos, ground truth next to checkpoint predictions, and training curves."""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from build_data import DatasetFiles, SegmentationDataset, present_classes, read_image, read_label  # noqa: E402
from dataset_table import color_map  # noqa: E402
from helpers import UserError, atomic_save, resolve_device  # noqa: E402
from module_list import IGNORE_INDEX  # noqa: E402
from network import load_model, predict  # noqa: E402

ALPHA = 0.7  # colour over photo, as the reference's Image.blend(photo, colours, 0.7)


def blend(photo: np.ndarray, label: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """70 % label colour over 30 % photo: photo uint8 [H,W,3], label [H,W] (ignore -> palette row 255)."""
    colours = color_map(label, palette)
    return np.asarray(Image.blend(Image.fromarray(photo), Image.fromarray(colours), ALPHA))


def load_sample(data: DatasetFiles, index: int) -> tuple[str, np.ndarray, torch.Tensor, torch.Tensor]:
    """Test image `index`: (id, photo uint8 [h,w,3], normalised padded image [3,H,W], label [H,W])."""
    ids = data.list_ids("test")
    if not 0 <= index < len(ids):
        raise UserError(
            f"--index {index} is out of range: the {data.info.name} test list has {len(ids)} "
            f"images (0..{len(ids) - 1})"
        )
    image, label = SegmentationDataset(data, [ids[index]], "test")[0]
    photo = read_image(data.info, data.image_path(ids[index], "test"))
    return ids[index], photo, image, label


@torch.no_grad()
def segment(
    model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Argmax prediction [H,W] on the padded image, set to ignore where the ground truth is ignore."""
    model.eval().to(device)
    logits = predict(model, image[None].to(device), label.shape[-2:])
    prediction = logits[0].argmax(0).cpu()
    return prediction.masked_fill(label == IGNORE_INDEX, IGNORE_INDEX)


def draw_comparison(
    data: DatasetFiles,
    checkpoints: Sequence[str | Path],
    titles: Sequence[str],
    index: int | Sequence[int],
    out: str | Path,
    backbone: str | None = None,
    resnet_depth: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Draw ground truth | one panel per checkpoint for test image `index` (a row per image when several
    indices are given) and save it as a PNG at `out`."""
    if len(titles) != len(checkpoints):
        raise UserError(
            f"--titles has {len(titles)} entries for {len(checkpoints)} checkpoints: give one each"
        )
    info = data.info
    device = resolve_device(str(device))
    samples = [load_sample(data, i) for i in ([index] if isinstance(index, int) else index)]
    # panels are cropped back from the padded size to the image's own
    rows = [
        [blend(photo, label[: photo.shape[0], : photo.shape[1]], info.palette)]
        for _, photo, _, label in samples
    ]
    for path in checkpoints:
        model = load_model(path, info.num_classes, backbone, resnet_depth)
        for row, (_, photo, image, label) in zip(rows, samples):
            prediction = segment(model, image, label, device)
            row.append(blend(photo, prediction[: photo.shape[0], : photo.shape[1]], info.palette))
        del model

    height, width = samples[0][1].shape[:2]
    fig, axes = plt.subplots(
        len(rows),
        len(rows[0]),
        squeeze=False,
        figsize=(3 * len(rows[0]), 3 * height / width * len(rows) + 0.8),
    )
    for r, (row, (sample_id, *_)) in enumerate(zip(rows, samples)):
        for ax, panel, title in zip(axes[r], row, ["Ground Truth", *titles]):
            ax.imshow(panel)
            if r == 0:
                ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        if len(rows) > 1:
            axes[r, 0].set_ylabel(sample_id)
    name = info.name
    fig.suptitle(f"{name} {samples[0][0]}" if len(rows) == 1 else f"{name}: {len(rows)} test images")
    fig.tight_layout()
    out = Path(out)
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"), out)
    plt.close(fig)
    return out


def covering_choice(class_sets: Sequence[Collection[int]], count: int) -> list[int]:
    """Indices of up to `count` images that together show the most classes, chosen greedily: each pick
    adds the most classes not shown yet, then has the most classes, then the lowest index."""
    chosen: list[int] = []
    shown: set[int] = set()
    for _ in range(min(count, len(class_sets))):
        pick = max(
            (i for i in range(len(class_sets)) if i not in chosen),
            key=lambda i: (len(set(class_sets[i]) - shown), len(class_sets[i]), -i),
        )
        chosen.append(pick)
        shown |= set(class_sets[pick])
    return chosen


def covering_test_images(data: DatasetFiles, count: int = 4) -> list[int]:
    """Test-list indices of `count` images whose labels together show the most classes (covering_choice)."""
    ids = tqdm(
        data.list_ids("test"),
        desc="choosing the figure's images",
        leave=False,
        disable=not sys.stderr.isatty(),
    )  # every val label is read once (Pascal: 1,449)
    class_sets = [present_classes(read_label(data.info, data.label_path(i, "test"))).tolist() for i in ids]
    return covering_choice(class_sets, count)


def curve_panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each curves.png panel: every loss on its own axis (their scales differ: ReCo
    about 5, cross-entropy below 1), then the mIoUs, the accuracies and any ratios (FixMatch's and
    UniMatch's share of confident pseudo-labels)."""
    losses = [(name, [name]) for name in columns if name.endswith("loss")]
    ratios = [name for name in columns if name.endswith("ratio")]
    scores = [(kind, [name for name in columns if name.endswith(kind)]) for kind in ("miou", "acc")]
    return losses + scores + ([("ratio", ratios)] if ratios else [])


def plot_curves(metrics: np.ndarray, columns: Sequence[str], title: str, out: str | Path) -> None:
    """Losses, mIoUs, accuracies per epoch (metrics [epochs, columns]) in one PNG at `out` (curve_panels)."""
    epochs = np.arange(1, len(metrics) + 1)
    panels = curve_panels(columns)
    ncols = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, ncols, figsize=(5 * ncols, 7), squeeze=False)
    for ax, (kind, names) in zip(axes.flat, panels):
        for name in names:
            ax.plot(epochs, metrics[:, list(columns).index(name)], marker=".", label=name)
        ax.set(xlabel="epoch", title=kind)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=100), out)
    plt.close(fig)

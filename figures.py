"""Figures: label maps over photos, ground truth next to checkpoint predictions, and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from build_data import SegmentationDataset, color_map, data_root, dataset_info, image_path, list_ids, read_image  # noqa: E402
from helpers import UserError, atomic_save, resolve_device  # noqa: E402
from module_list import IGNORE_INDEX  # noqa: E402
from network import load_model, predict  # noqa: E402

ALPHA = 0.7  # colour over photo, as the reference's Image.blend(photo, colours, 0.7)


def blend(photo: np.ndarray, label: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """70 % label colour over 30 % photo: photo uint8 [H,W,3], label [H,W] (ignore -> palette row 255)."""
    colours = color_map(label, palette)
    return np.asarray(Image.blend(Image.fromarray(photo), Image.fromarray(colours), ALPHA))


def load_sample(dataset: str, root: str | Path | None, index: int) -> tuple[str, np.ndarray, torch.Tensor,
                                                                           torch.Tensor]:
    """Test image `index`: (id, photo uint8 [h,w,3] at its own size, normalised padded image [3,H,W], label [H,W])."""
    info = dataset_info(dataset, root)
    root = data_root(info, root)
    ids = list_ids(info, root, "test")
    if not 0 <= index < len(ids):
        raise UserError(f"--index {index} is out of range: the {dataset} test list has {len(ids)} images "
                        f"(0..{len(ids) - 1})")
    image, label = SegmentationDataset(info, root, [ids[index]], "test")[0]
    photo = read_image(info, image_path(info, root, ids[index], "test"))
    return ids[index], photo, image, label


@torch.no_grad()
def segment(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Argmax prediction [H,W] on the padded image, set to ignore where the ground truth is ignore."""
    model.eval().to(device)
    logits = predict(model, image[None].to(device), label.shape[-2:])
    prediction = logits[0].argmax(0).cpu()
    return prediction.masked_fill(label == IGNORE_INDEX, IGNORE_INDEX)


def draw_figure(dataset: str, checkpoints: Sequence[str | Path], titles: Sequence[str], index: int,
                out: str | Path, data_root: str | Path | None = None, backbone: str | None = None,
                resnet_depth: int | None = None, device: str | torch.device = "cpu") -> Path:
    """Draw ground truth | one panel per checkpoint for test image `index` and save it as a PNG at `out`."""
    if len(titles) != len(checkpoints):
        raise UserError(f"--titles has {len(titles)} entries for {len(checkpoints)} checkpoints: give one each")
    info = dataset_info(dataset, data_root)
    device = resolve_device(str(device))
    sample_id, photo, image, label = load_sample(dataset, data_root, index)
    height, width = photo.shape[:2]  # panels are cropped back from the padded size to the image's own

    panels = [blend(photo, label[:height, :width], info.palette)]
    for path in checkpoints:
        model = load_model(path, info.num_classes, backbone, resnet_depth)
        prediction = segment(model, image, label, device)
        panels.append(blend(photo, prediction[:height, :width], info.palette))
        del model

    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3 * height / width + 0.8))
    for ax, panel, title in zip(np.atleast_1d(axes), panels, ["Ground Truth", *titles]):
        ax.imshow(panel)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{dataset} {sample_id}")
    fig.tight_layout()
    out = Path(out)
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"), out)
    plt.close(fig)
    return out


def plot_curves(metrics: np.ndarray, columns: Sequence[str], title: str, out: str | Path) -> None:
    """Losses, mIoUs and accuracies per epoch (metrics [epochs, columns]) in one PNG at `out`."""
    epochs = np.arange(1, len(metrics) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, kind in zip(axes, ("loss", "miou", "acc")):
        for name, column in zip(columns, metrics.T):
            if name.endswith(kind):
                ax.plot(epochs, column, marker=".", label=name)
        ax.set(xlabel="epoch", title=kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=100), out)
    plt.close(fig)

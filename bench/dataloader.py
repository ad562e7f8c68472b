"""Loader throughput on Pascal-sized data: crops/s of the labelled train loader for several worker counts, of
the unlabelled train loader (plain crops at scale 1), and of batch_transform on a device batch (the unlabelled
path). In a semi-supervised run each branch has its own loader and workers: at S s per step with batch B, each
loader must deliver B / S crops/s (10 / 0.10 s = 100 crops/s at the Pascal defaults).

    python bench/dataloader.py [--images 64] [--iters 20] [--workers 0 1 2] [--json out.json]

Generates synthetic 500x375 JPEG/PNG pairs in a temporary folder (Pascal layout), crop 321x321,
scale 0.5-1.5, augmentation on, batch 10. Prints JSON, then a short table.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_data as bd  # noqa: E402
import dataset_table as dt  # noqa: E402
import transforms  # noqa: E402
from layouts import resolve_dataset  # noqa: E402


def make_images(root: Path, count: int) -> list[str]:
    """Pascal-layout JPEG images with smooth content and grayscale PNG labels, 500x375 (WxH)."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    ids = [f"img{k:03d}" for k in range(count)]
    yy, xx = np.mgrid[0:375, 0:500]
    for image_id in ids:
        phase = rng.uniform(0, 6.28, 3)
        image = np.stack([127 + 120 * np.sin(xx / 37 + p + yy / 53) for p in phase], axis=-1)
        Image.fromarray(image.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        label = ((xx // 50 + yy // 60) % 21).astype(np.uint8)
        label[:, :5] = dt.VOID
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
    (root / "train_aug.txt").write_text("\n".join(ids))
    return ids


def loader_rate(dataset: bd.SegmentationDataset, workers: int, batch: int, iters: int) -> float:
    """Crops per second over one epoch of `iters` batches, after a warm-up epoch (no worker start-up)."""
    loader = bd.build_train_loader(dataset, batch, iters, num_workers=workers, seed=0)
    loader.set_epoch(0)
    for _ in loader:  # warm-up: starts the (persistent) workers
        pass
    loader.set_epoch(1)
    start = time.perf_counter()
    for _ in loader:
        pass
    return batch * iters / (time.perf_counter() - start)


def transform_rate(device: torch.device, batch: int, repeats: int = 20) -> float:
    """Crops per second of batch_transform (crop 321, scale 0.5-1.5, augmentation) on a 321x321 batch."""
    images = torch.randn(batch, 3, 321, 321, device=device)
    labels = torch.randint(0, 21, (batch, 321, 321), device=device)
    conf = torch.rand(batch, 321, 321, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        transforms.batch_transform(images, labels, conf, (321, 321), (0.5, 1.5), True, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        transforms.batch_transform(images, labels, conf, (321, 321), (0.5, 1.5), True, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    info = dt.DATASETS["pascal"]
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "crop": list(info.crop_size),
        "scale_range": list(info.scale_range),
        "batch": args.batch,
        "loader_crops_per_s": {},
        "unlabelled_loader_crops_per_s": {},
        "batch_transform_crops_per_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ids = make_images(Path(tmp), args.images)
        data = resolve_dataset("pascal", tmp)
        dataset = bd.SegmentationDataset(
            data, ids, "train", crop_size=info.crop_size, scale_range=info.scale_range, augmentation=True
        )
        plain = bd.SegmentationDataset(
            data, ids, "train", crop_size=info.crop_size, scale_range=(1.0, 1.0), augmentation=False
        )
        for workers in args.workers:
            results["loader_crops_per_s"][str(workers)] = round(
                loader_rate(dataset, workers, args.batch, args.iters), 1
            )
            results["unlabelled_loader_crops_per_s"][str(workers)] = round(
                loader_rate(plain, workers, args.batch, args.iters), 1
            )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        results["batch_transform_crops_per_s"][device.type] = round(transform_rate(device, args.batch), 1)

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\npath                          crops/s")
    for workers, rate in results["loader_crops_per_s"].items():
        print(f"train loader, {workers} worker(s)      {rate:9.1f}")
    for workers, rate in results["unlabelled_loader_crops_per_s"].items():
        print(f"unlabelled loader, {workers} worker(s) {rate:9.1f}")
    for device, rate in results["batch_transform_crops_per_s"].items():
        print(f"batch_transform on {device:<10} {rate:9.1f}")


if __name__ == "__main__":
    main()

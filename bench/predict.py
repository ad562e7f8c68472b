"""predict.py throughput: images/s end to end (decode, pad, predict, argmax, write the palette PNGs).

    python bench/predict.py [--configs r101 r18] [--images 8] [--device cpu] [--amp off bf16] \
        [--json out.json]

r101: ResNet-101 DeepLabv3+, 21 classes (Pascal), synthetic 500x500 JPEGs (padded to 513x513), batch 4.
r18:  ResNet-18 DeepLabv3+, 5 classes, the demo dataset's 96x96 images (padded to 97x97), batch 4.
Random weights (the speed does not depend on them). Each configuration runs twice on the same images; the
second (warm) run is reported. Prints JSON, then a short table.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import network  # noqa: E402
import predict  # noqa: E402
import preparation  # noqa: E402

CONFIGS = {  # name -> (dataset, classes, resnet depth, image size or None for the demo's own images)
    "r101": ("pascal", 21, 101, (500, 500)),
    "r18": ("demo", 5, 18, None),
}


def make_inputs(folder: Path, count: int, size: tuple[int, int] | None) -> Path:
    """`count` JPEGs of `size` (H, W) with smooth content, or the demo dataset's first `count` images."""
    images = folder / "images"
    images.mkdir()
    if size is None:
        demo = preparation.make_demo_dataset(folder / "demo", seed=0)
        for path in sorted((demo / "JPEGImages").glob("*.jpg"))[:count]:
            (images / path.name).write_bytes(path.read_bytes())
        return images
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    for k in range(count):
        phase = rng.uniform(0, 6.28, 3)
        pixels = np.stack([127 + 120 * np.sin(xx / 37 + p + yy / 53) for p in phase], axis=-1)
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"img{k:03d}.jpg", quality=90)
    return images


def run_config(name: str, images: int, device: str, amp: str, batch: int, workers: int, flip: bool) -> dict:
    dataset, classes, depth, size = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_inputs(tmp, images, size)
        checkpoint = tmp / f"{name}.pth"
        torch.manual_seed(0)
        torch.save(network.build_model("deeplabv3p", classes, resnet_depth=depth).state_dict(), checkpoint)
        argv = [
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(folder),
            "--dataset",
            dataset,
            "--device",
            device,
            "--amp",
            amp,
            "--batch_size",
            str(batch),
            "--num_workers",
            str(workers),
        ] + ["--flip"] * flip
        cold = predict.main(argv + ["--output", str(tmp / "cold")])
        warm = predict.main(argv + ["--output", str(tmp / "warm")])
        height, width = Image.open(next(folder.iterdir())).size[::-1]
    return {
        "config": name,
        "resnet_depth": depth,
        "classes": classes,
        "image_hw": [height, width],
        "padded_hw": list(predict.padded_size(height, width)),
        "images": images,
        "batch": batch,
        "device": device,
        "amp": amp,
        "flip": flip,
        "workers": workers,
        "cold_images_per_s": cold["written"] / cold["seconds"],
        "images_per_s": warm["written"] / warm["seconds"],
        "seconds": warm["seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"])
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = [
        run_config(name, args.images, args.device, amp, args.batch_size, args.num_workers, args.flip)
        for name in args.configs
        for amp in args.amp
    ]
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    report = {"machine": machine, "results": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{'config':<6} {'image':>9} {'padded':>9} {'batch':>5} {'amp':>4} {'images/s':>9} {'cold':>7}")
    for r in rows:
        print(
            f"{r['config']:<6} {'x'.join(map(str, r['image_hw'])):>9} "
            f"{'x'.join(map(str, r['padded_hw'])):>9} "
            f"{r['batch']:>5} {r['amp']:>4} {r['images_per_s']:>9.2f} {r['cold_images_per_s']:>7.2f}"
        )


if __name__ == "__main__":
    main()

"""Seconds per training iteration and peak memory of sup, semisup and semisup + ReCo steps.

Runs the engine's own optimisation step on synthetic batches (so data loading is not measured):
    python bench/train_step.py                       # CPU, small size
    python bench/train_step.py --device cuda --size pascal --amp off bf16 [--sync_check]
Prints one JSON line per configuration and a table at the end.
"""

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without PYTHONPATH

import torch  # noqa: E402

import distributed  # noqa: E402
import engine  # noqa: E402
import helpers  # noqa: E402
import options  # noqa: E402
from build_data import dataset_info  # noqa: E402
from module_list import ConfMatrix  # noqa: E402

SIZES = {  # the reference's Pascal defaults, and a size a laptop CPU gets through in seconds
    "pascal": ["--dataset", "pascal", "--resnet_depth", "101"],
    "small": ["--dataset", "pascal", "--resnet_depth", "18", "--batch_size", "2", "--crop_size", "97", "97"],
}
MODES = {"sup": ("sup", []), "semisup": ("semi", ["--apply_aug", "classmix"]),
         "semisup+reco": ("semi", ["--apply_aug", "classmix", "--apply_reco"])}


def synthetic_batch(batch: int, crop, num_classes: int, device, generator):
    """Images and labels made of a few class blocks per image, with some ignored pixels, like real crops."""
    h, w = crop
    images = torch.randn(batch, 3, h, w, generator=generator).to(device)
    blocks = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=generator).float()
    labels = torch.nn.functional.interpolate(blocks, size=(h, w), mode="nearest")[:, 0].long()
    labels[:, :, : w // 20] = -1  # a void strip
    return images, labels.to(device)


def bench(name: str, size: str, amp: str, device: str, steps: int, sync_check: bool, profile: bool) -> dict:
    mode, extra = MODES[name]
    args = options.resolve_args(options.get_args_parser(mode).parse_args(
        SIZES[size] + extra + ["--amp", amp, "--pretrained", "none", "--device", device]))
    info = dataset_info(args.dataset)
    run = engine.build_run(args, info, distributed.Dist(0, 1, torch.device(device)))
    run.student.train()
    g = torch.Generator().manual_seed(0)
    per_loader = args.batch_size if mode == "semi" else 2 * args.batch_size
    batch = [synthetic_batch(per_loader, args.crop_size, info.num_classes, device, g)
             for _ in range(2 if mode == "semi" else 1)]
    monitors = [ConfMatrix(info.num_classes, torch.device(device)) for _ in range(2)]
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator growth
        engine.optimisation_step(run, batch, monitors)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        engine.optimisation_step(run, batch, monitors)
    sync()
    seconds = (time.perf_counter() - start) / steps
    syncs = None
    if sync_check and cuda:  # separate, untimed steps: the debug mode itself costs time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for _ in range(2):
                engine.optimisation_step(run, batch, monitors)
            torch.cuda.set_sync_debug_mode("default")
        syncs = sorted({str(w.message).splitlines()[0] for w in caught
                        if "synchroniz" in str(w.message) and "prototype" not in str(w.message)})
    if profile and cuda:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.optimisation_step(run, batch, monitors)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    result = {"config": name, "size": size, "amp": amp, "device": device,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu",
              "batch": f"{per_loader}" + (f"+{per_loader}" if mode == "semi" else ""),
              "crop": list(args.crop_size), "resnet_depth": args.resnet_depth, "s_per_iter": round(seconds, 4),
              "peak_gib": round((torch.cuda.max_memory_allocated() if cuda else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 3),
              "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS"}
    if syncs is not None:
        result["host_syncs"] = syncs
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="small", choices=SIZES)
    p.add_argument("--amp", nargs="+", default=["off"], choices=tuple(helpers.AMP_DTYPES))
    p.add_argument("--configs", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sync_check", action="store_true", help="report host syncs (CUDA's sync debug mode)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one step (CUDA)")
    args = p.parse_args()
    rows = []
    for amp in args.amp:
        for name in args.configs:
            row = bench(name, args.size, amp, args.device, args.steps, args.sync_check, args.profile)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'config':14} {'amp':5} {'batch':7} {'crop':9} {'s/iter':>8} {'peak GiB':>9}  ({rows[0]['device_name']})")
    for r in rows:
        print(f"{r['config']:14} {r['amp']:5} {r['batch']:7} {'x'.join(map(str, r['crop'])):9} "
              f"{r['s_per_iter']:8.3f} {r['peak_gib']:9.2f}")


if __name__ == "__main__":
    main()

"""Seconds per training iteration and peak memory of sup, semisup (the mean teacher), FixMatch and UniMatch
steps, with and without ReCo, compiled or not; the semi-supervised steps at one batch and crop.

Runs the engine's own optimisation step on synthetic batches (so data loading is not measured):
    python bench/train_step.py               # CPU, small size, eager vs torch.compile
    python bench/train_step.py --device cuda --size pascal --amp off bf16 --compile off reduce-overhead \
        --sync_check --kernels               # the GPU table (12 rows, 6 compiled; --amp bf16 alone halves it)
Prints one JSON line per configuration and a table at the end. Compilation happens in engine.build_run
(its seconds are the 'compile s' column), so the timed steps are the compiled ones. 'first losses' are the
first step's logged losses from the same seed: equal within float noise across --compile and --channels_last.
The step is the training loop's, with its guard (one host read per step of the non-finite and stop flags,
which --sync_check lists; --guard off on leaves it out, for its cost side by side).
--kernels (CUDA) profiles one step: host launch calls, kernels run and the summed duration of the device's
work (GPU busy time; the step's s/iter over it says how much the host makes the device wait).
--deterministic times the step with the training flag of that name (deterministic kernels only); its cost is
the s/iter of a run with it over one without.
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
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile as torch_profile  # noqa: E402

import distributed  # noqa: E402
import engine  # noqa: E402
import helpers  # noqa: E402
import options  # noqa: E402
import run_folder  # noqa: E402
from acceleration import COMPILE_CHOICES, LAYOUT_CHOICES  # noqa: E402
from faults import StopSignals  # noqa: E402
from layouts import resolve_dataset  # noqa: E402
from module_list import ONLINE_METHODS, ConfMatrix  # noqa: E402

SIZES = {  # the reference's Pascal defaults, and a size a laptop CPU gets through in seconds
    "pascal": [
        "--dataset",
        "pascal",
        "--resnet_depth",
        "101",
        "--batch_size",
        "10",
        "--crop_size",
        "321",
        "321",
    ],
    "small": ["--dataset", "pascal", "--resnet_depth", "18", "--batch_size", "2", "--crop_size", "97", "97"],
    "crop161": [
        "--dataset",
        "pascal",
        "--resnet_depth",
        "101",
        "--batch_size",
        "2",
        "--crop_size",
        "161",
        "161",
    ],
}
MODES = {
    "sup": ("sup", []),
    "semisup": ("semi", ["--apply_aug", "classmix"]),
    "semisup+reco": ("semi", ["--apply_aug", "classmix", "--apply_reco"]),
    "fixmatch": ("semi", ["--method", "fixmatch"]),
    "unimatch": ("semi", ["--method", "unimatch"]),
    "unimatch+reco": ("semi", ["--method", "unimatch", "--apply_reco"]),
}


def synthetic_batch(batch: int, crop, num_classes: int, device, generator):
    """Images and labels made of a few class blocks per image, with some ignored pixels, like real crops."""
    h, w = crop
    images = torch.randn(batch, 3, h, w, generator=generator).to(device)
    blocks = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=generator).float()
    labels = torch.nn.functional.interpolate(blocks, size=(h, w), mode="nearest")[:, 0].long()
    labels[:, :, : w // 20] = -1  # a void strip
    return images, labels.to(device)


def synthetic_unlabelled(batch: int, crop, device, generator):
    """FixMatch's and UniMatch's unlabelled item as the loader gives it: weak crops in [0, 1] with a padded
    strip, their padding and labels (monitor only), and the mix batch's weak crops and padding."""
    h, w = crop
    weak, mix = (torch.rand(batch, 3, h, w, generator=generator) for _ in range(2))
    padding = torch.zeros(batch, h, w, dtype=torch.bool)
    padding[:, :, -(w // 10) :] = True
    labels = torch.full((batch, h, w), -1, dtype=torch.long)
    return [
        t.to(device)
        for t in (
            weak.masked_fill(padding[:, None], 0),
            padding,
            labels,
            mix.masked_fill(padding[:, None], 0),
            padding,
        )
    ]


LAUNCHES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)


def device_work(prof) -> tuple[int, int, float]:
    """(host launch calls, kernels run on the device, summed milliseconds of device work) in a CUDA profile.

    Under CUDA graphs one cudaGraphLaunch runs many kernels: launches then fall while kernels stay."""
    events = prof.events()
    launches = sum(1 for e in events if e.name in LAUNCHES)
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = sum(1 for e in device if not e.name.startswith(("Memcpy", "Memset")))
    return launches, kernels, sum(e.time_range.elapsed_us() for e in device) / 1000


def bench(
    name: str,
    size: str,
    amp: str,
    device: str,
    steps: int,
    sync_check: bool,
    profile: bool,
    compile_mode: str,
    channels_last: str,
    kernels: bool,
    guarded: bool,
    deterministic: bool = False,
) -> dict:
    mode, extra = MODES[name]
    args = options.resolve_args(
        options.get_args_parser(mode).parse_args(
            SIZES[size]
            + extra
            + [
                "--amp",
                amp,
                "--pretrained",
                "none",
                "--device",
                device,
                "--compile",
                compile_mode,
                "--channels_last",
                channels_last,
            ]
            + ["--deterministic"] * deterministic
        )
    )
    info = resolve_dataset(args.dataset).info
    torch.compiler.reset()  # each row compiles afresh (and stays under Dynamo's per-function recompile limit)
    run = engine.build_run(args, info, distributed.Dist(0, 1, torch.device(device)))
    run.student.train()
    g = torch.Generator().manual_seed(0)
    per_loader = run_folder.labelled_batch(args.batch_size, semi=mode == "semi")
    batch = [
        synthetic_batch(per_loader, args.crop_size, info.num_classes, device, g)
        for _ in range(2 if mode == "semi" else 1)
    ]
    online = run.method in ONLINE_METHODS
    if online:
        batch[1] = synthetic_unlabelled(per_loader, args.crop_size, device, g)
    monitors = [ConfMatrix(info.num_classes, torch.device(device)) for _ in range(2)]
    cuda = device.startswith("cuda")
    guard = engine.build_guard(run, monitors, StopSignals()) if guarded else None

    def step() -> torch.Tensor:
        return engine.optimisation_step(run, batch, monitors, guard)[0]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    first = step().tolist()
    for _ in range(2):  # warm-up: cuDNN autotuning, allocator growth, CUDA graph recording
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    seconds, cpu_seconds = (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps
    syncs = None
    if sync_check and cuda:  # separate, untimed steps: the debug mode itself costs time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for _ in range(2):
                step()
            torch.cuda.set_sync_debug_mode("default")
        syncs = sorted(
            {
                str(w.message).splitlines()[0]
                for w in caught
                if "synchroniz" in str(w.message) and "prototype" not in str(w.message)
            }
        )
    work = None
    if profile or (kernels and cuda):
        with torch_profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        ) as prof:
            step()
            sync()
        if profile:
            print(f"--- {name} {amp} compile {run.compile_mode}", file=sys.stderr)
            print(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25
                ),
                file=sys.stderr,
            )
        if cuda:
            work = device_work(prof)
    result = {
        "config": name,
        "size": size,
        "amp": amp,
        "device": device,
        "compile": run.compile_mode,
        "guard": guarded,
        "deterministic": deterministic,
        "channels_last": next(run.model.parameters()).is_contiguous(memory_format=torch.channels_last)
        and not next(run.model.parameters()).is_contiguous(),
        "compile_s": None if run.compile_s is None else round(run.compile_s, 1),
        "first_losses": [round(v, 5) for v in first],
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": f"{per_loader}" + f"+{per_loader}" * (mode == "semi") + f"+{per_loader}" * online,
        "crop": list(args.crop_size),
        "resnet_depth": args.resnet_depth,
        "s_per_iter": round(seconds, 4),
        "cpu_s_per_iter": round(cpu_seconds, 4),
        "threads": torch.get_num_threads(),
        "peak_gib": round(
            (
                torch.cuda.max_memory_allocated()
                if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            / 2**30,
            3,
        ),
        "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
    }
    if syncs is not None:
        result["host_syncs"] = syncs
    if work is not None:
        result["launches_per_step"], result["kernels_per_step"] = work[0], work[1]
        result["gpu_busy_ms"] = round(work[2], 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="small", choices=SIZES)
    p.add_argument("--amp", nargs="+", default=["off"], choices=tuple(helpers.AMP_DTYPES))
    p.add_argument("--configs", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sync_check", action="store_true", help="report host syncs (CUDA's sync debug mode)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one step")
    p.add_argument(
        "--compile",
        nargs="+",
        default=["off", "default"],
        choices=COMPILE_CHOICES[1:],
        help="torch.compile modes side by side ('off' = eager)",
    )
    p.add_argument("--channels_last", nargs="+", default=["auto"], choices=LAYOUT_CHOICES)
    p.add_argument(
        "--guard",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="the non-finite/stop guard of the training loop (its one host read per step)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (1 makes the process's CPU seconds a fair measure on a shared machine)",
    )
    p.add_argument(
        "--kernels", action="store_true", help="kernels launched and GPU busy time of one step (CUDA)"
    )
    p.add_argument(
        "--deterministic", action="store_true", help="the training flag: deterministic kernels only"
    )
    args = p.parse_args()
    distributed.use_deterministic(args.deterministic)  # before CUDA starts, as the training scripts do
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for amp in args.amp:
        for name in args.configs:
            for layout in args.channels_last:
                for mode in args.compile:
                    for guarded in args.guard:
                        row = bench(
                            name,
                            args.size,
                            amp,
                            args.device,
                            args.steps,
                            args.sync_check,
                            args.profile,
                            mode,
                            layout,
                            args.kernels,
                            guarded == "on",
                            args.deterministic,
                        )
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    print(
        f"\n{'config':14} {'amp':5} {'compile':15} {'guard':5} {'NHWC':5} {'batch':7} {'crop':9} "
        f"{'s/iter':>8} {'CPU s':>7} {'peak GiB':>9} {'compile s':>9} {'launches':>8} {'kernels':>8} "
        f"{'GPU ms':>8}  first losses  ({rows[0]['device_name']})"
    )
    for r in rows:
        print(
            f"{r['config']:14} {r['amp']:5} {r['compile']:15} {'on' if r['guard'] else 'off':5} "
            f"{'yes' if r['channels_last'] else 'no':5} "
            f"{r['batch']:7} {'x'.join(map(str, r['crop'])):9} {r['s_per_iter']:8.3f} "
            f"{r['cpu_s_per_iter']:7.3f} {r['peak_gib']:9.2f} "
            f"{r['compile_s'] if r['compile_s'] is not None else '-':>9} "
            f"{r.get('launches_per_step', '-'):>8} {r.get('kernels_per_step', '-'):>8} "
            f"{r.get('gpu_busy_ms', '-'):>8}  {' '.join(f'{v:.4f}' for v in r['first_losses'])}"
        )


if __name__ == "__main__":
    main()

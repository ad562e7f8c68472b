"""Benchmark compute_reco_loss forward + backward at the reference's ReCo sizes.

    python bench/reco_loss.py [--device cpu|cuda] [--repeats 10] [--threads N]

Prints one JSON line, then a short table. Peak RSS is the whole process (resource.getrusage); on CUDA the
peak GPU memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from module_list import compute_reco_loss  # noqa: E402


def make_inputs(
    batch: int, size: int, num_classes: int, dim: int, present: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Blocky labels over `present` of num_classes classes, 90 % valid pixels, soft (mostly hard) scores."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=gen)[:present]
    coarse = classes[torch.randint(0, present, (batch, 1, 6, 6), generator=gen)].float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
    label = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    mask = (torch.rand(batch, 1, size, size, generator=gen) < 0.9).float()
    prob = (torch.randn(batch, num_classes, size, size, generator=gen) * 2 + 4 * label).softmax(1)
    rep = torch.randn(batch, dim, size, size, generator=gen)
    return tuple(t.to(device) for t in (rep, label, mask, prob))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=41, help="feature map side (h = w)")
    parser.add_argument("--num_classes", type=int, default=21)
    parser.add_argument("--present", type=int, default=11, help="classes present in the batch")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num_queries", type=int, default=256)
    parser.add_argument("--num_negatives", type=int, default=512)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    device = torch.device(args.device)

    rep, label, mask, prob = make_inputs(
        args.batch, args.size, args.num_classes, args.dim, args.present, device
    )
    rep.requires_grad_(True)

    def step() -> torch.Tensor:
        rep.grad = None
        loss = compute_reco_loss(rep, label, mask, prob, 0.97, 0.5, args.num_queries, args.num_negatives)
        loss.backward()
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)

    result = {
        "bench": "reco_loss fwd+bwd",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "shape": {
            "B": args.batch,
            "h": args.size,
            "w": args.size,
            "C": args.num_classes,
            "D": args.dim,
            "Q": args.num_queries,
            "N": args.num_negatives,
            "present_classes": int(((label * mask).sum((0, 2, 3)) > 0).sum()),
        },
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": args.repeats,
        "loss": float(loss),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 2**20,  # ru_maxrss is KiB on Linux
        "platform": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        result["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))
    print(f"{'metric':<32}{'value':>12}")
    print(f"{'median fwd+bwd (s)':<32}{result['median_s']:>12.4f}")
    print(f"{'min fwd+bwd (s)':<32}{result['min_s']:>12.4f}")
    print(f"{'peak RSS, whole process (GiB)':<32}{result['peak_rss_gib']:>12.3f}")
    if device.type == "cuda":
        print(f"{'CUDA max allocated (GiB)':<32}{result['cuda_max_memory_allocated_gib']:>12.3f}")


if __name__ == "__main__":
    main()

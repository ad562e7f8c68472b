"""Processes: torchrun's environment, collectives that are no-ops in a single process, seeding and
deterministic kernels."""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from helpers import resolve_device, stream_seed


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(args: argparse.Namespace) -> Dist:
    """Read torchrun's environment: NCCL on CUDA, gloo on CPU; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(args.device) if args.device else None
    want_cuda = chosen.type == "cuda" if chosen else torch.cuda.is_available()
    if world_size == 1:
        return Dist(0, 1, chosen or torch.device(f"cuda:{args.gpu}" if want_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # torchrun's agent keeps one key-value store across restarts (--max-restarts): a restarted group would
        # read the addresses its dead predecessors left there, so each attempt keeps its keys apart
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if want_cuda else "gloo",
            store=dist.PrefixStore(f"attempt{attempt}/", store),
            rank=rank,
            world_size=size,
        )
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN statistics, which each rank updates on its own batches)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then leave the process group (a no-op in a single process)."""
    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(stream: str, *keys: int) -> None:
    """Seed torch (all devices), numpy and random for one named stream and its keys, e.g. ("steps", seed,
    epoch, rank); see helpers.stream_seed."""
    seed = stream_seed(stream, *keys)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def use_deterministic(on: bool) -> None:
    """--deterministic on or off for this process (call it before CUDA starts): deterministic kernels only.
    Without it, CUDA kernels that add with atomics (convolution backward, index_add, ...) make GPU runs
    differ run to run."""
    if on:  # cuBLAS reads it when it creates its first handle: a fixed workspace keeps its sums in one order
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)  # an op without a deterministic kernel raises, naming itself
    torch.backends.cudnn.deterministic = on  # engine.build_run also turns cuDNN's autotuning off

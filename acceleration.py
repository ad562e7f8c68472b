"""Speed-ups that change no result: torch.compile of the model's forward and backward (CUDA graphs where the
shapes are static) and the channels-last memory format for the convolutions."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
LAYOUT_CHOICES = ("auto", "on", "off")
# What --compile auto means per device type: the fastest measured with bench/train_step.py. On the 2-core CPU
# compiling is not faster (docs/performance.md) and costs minutes; on CUDA no figure has been taken yet, so it
# stays off until the bench shows a gain (`--compile reduce-overhead` is the mode for launch-bound steps).
AUTO_COMPILE = {"cpu": "off", "cuda": "off"}
# --channels_last auto: NHWC convolutions are what cuDNN's tensor-core kernels read (bf16/fp16/TF32); on the
# CPU the gain was within the noise of the shared machine (docs/performance.md), so the default layout stays.
AUTO_CHANNELS_LAST = {"cpu": False, "cuda": True}


def compile_mode(requested: str, device: torch.device, world_size: int) -> tuple[str, str | None]:
    """The torch.compile mode a run uses ('off' = eager) and, if it differs from the request, why."""
    mode = AUTO_COMPILE.get(device.type, "off") if requested == "auto" else requested
    if mode == "off":
        return mode, None
    missing = _missing_compiler(device)
    if missing:
        return "off", f"--compile {requested}: {missing}, so the model runs eagerly"
    if mode == "reduce-overhead" and device.type != "cuda":
        return "default", "--compile reduce-overhead: CUDA graphs exist on CUDA only; compiling without them"
    # pytorch/pytorch#139207: BN buffers under DDP skip graphs
    if mode == "reduce-overhead" and world_size > 1:
        return (
            "default",
            "--compile reduce-overhead: CUDA graphs are skipped for BatchNorm under DDP; "
            "compiling without them",
        )
    return mode, None


def _missing_compiler(device: torch.device) -> str | None:
    """What the inductor backend lacks on this machine (Triton for CUDA, a C++ compiler for CPU), or None."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"
    if any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++ or clang++) is on the PATH"


def compile_options(mode: str) -> dict:
    """torch.compile's keyword arguments for a mode: static shapes (the crop and batch are fixed)."""
    return {"mode": mode, "dynamic": False}


def compile_in_place(module: nn.Module, mode: str) -> None:
    """Compile `module`'s forward (and, through AOTAutograd, its backward) in place; state_dict keys stay."""
    if mode != "off":
        module.compile(**compile_options(mode))


def memory_format(requested: str, device: torch.device) -> torch.memory_format:
    """The memory format of the model's weights and inputs: channels-last where it is faster."""
    on = AUTO_CHANNELS_LAST.get(device.type, False) if requested == "auto" else requested == "on"
    return torch.channels_last if on else torch.contiguous_format


def step_begin(mode: str) -> None:
    """Mark a new training iteration for CUDA graphs (the previous step's outputs may be overwritten)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def _tensors(outputs) -> list[torch.Tensor]:
    """The tensors in a module's outputs (a tensor, or nested lists and tuples with None)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for part in outputs if part is not None for t in _tensors(part)]


def warm_up(
    calls: Sequence[tuple[nn.Module, Sequence[torch.Size], dict, bool]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    mode: str,
) -> float:
    """Compile now, on zeros of the training shapes, without changing any weight, buffer or gradient; seconds.

    calls: (module, input shapes, keyword arguments, backward) as the training step makes them. BatchNorm
    statistics are restored afterwards and gradients cleared, so the run's results are those of an uncompiled
    start.
    """
    started = time.perf_counter()
    for _ in range(3 if mode == "reduce-overhead" else 1):  # CUDA graphs: warm-up run, then recording
        step_begin(mode)
        for module, shapes, options, backward in calls:
            saved = [buffer.clone() for buffer in module.buffers()]
            with torch.set_grad_enabled(backward), autocast():
                outputs = module(*(torch.zeros(s, device=device) for s in shapes), **options)
            if backward:
                torch.stack([t.float().sum() for t in _tensors(outputs)]).sum().mul(0).backward()
            with torch.no_grad():
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)
            for parameter in module.parameters():
                parameter.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once, before training: the time must include the device's work
    return time.perf_counter() - started

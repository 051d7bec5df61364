"""Where and how the networks run: device choice (CUDA when present and asked for, CPU always), numeric
precision, batch sizes bounded by memory, and the memory layout of the convolutions."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from retalk.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions: the request and the CLI use this module's names without paying
# for torch (the preview engine never needs it)

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_BATCH_MB = 256  # activation budget of one CPU forward pass (see batch_size)
MAX_BATCH = 16


def resolve_device(name: str = "auto") -> torch.device:
    """Map the CLI's ``auto|cpu|cuda[:N]`` to a torch device, refusing CUDA where there is none."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        return torch.device(name)
    raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run: fp16 is for CUDA only (on a CPU it is slower than fp32;
    bf16 is the CPU's 16-bit type)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The networks' arithmetic: fp32 (the default, what the golden tests hold to), or bf16 / fp16 mixed
    precision through ``torch.autocast`` (convolutions and matmuls in 16 bits, reductions in fp32)."""
    import torch

    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def batch_size(device: torch.device, item_mb: float) -> int:
    """Items per forward pass for a network whose activations take ``item_mb`` per item.

    On a CPU the batch stays within ``CPU_BATCH_MB``: measured on 2 cores, the 512 px networks (GPEN,
    GFPGAN, ParseNet: 450-550 MB an item) and E-Net run *slower* per item in batches (their activations
    spill out of the caches) while small ones (face3d, L-Net) gain from them. On CUDA: half the free memory.
    """
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        budget = free / 2**20 / 2
    else:
        budget = CPU_BATCH_MB
    return int(max(1, min(MAX_BATCH, budget // max(item_mb, 1))))


def channels_last(model: nn.Module) -> nn.Module:
    """Run ``model``'s 2-D convolutions in NHWC layout (weights converted once, 4-D inputs on entry).

    Same numbers, different speed: measured on the CPU at batch 1, ParseNet -27 %, GFPGAN -18 %, GPEN -5 %
    per forward pass, but E-Net, D-Net and face3d got slower, so only those three loaders use it.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)

    def nhwc_inputs(_module: nn.Module, args: tuple) -> tuple:
        return tuple(
            a.contiguous(memory_format=torch.channels_last)
            if isinstance(a, torch.Tensor) and a.dim() == 4
            else a
            for a in args
        )

    model.register_forward_pre_hook(nhwc_inputs)
    return model

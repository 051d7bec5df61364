"""Per-network CPU forward time at batch 1 and 8, through the real loaders on synthetic checkpoints.

    python benchmarks/models.py [--checkpoints DIR] [--batch 1 8] [--repeat 3] [--threads 2] [--only LNet ...]

The checkpoints are written by ``retalk.checkpoints.synth`` (cached between runs). The reference column is
``median_s`` of ../shared/reference/timing.json (the reference code, batch 1, 2 threads) when present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import platformdirs
import torch

from retalk import checkpoints
from retalk.bench import default_reference_timing
from retalk.device import autocast

# the synthetic checkpoints, kept between runs
SYNTHETIC = Path(platformdirs.user_cache_dir("retalk")) / "synthetic"


def build_network(
    files: tuple[str, ...], folder: Path, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The network of its first file (E-Net's also reads L-Net's), as the engine loads it."""
    return checkpoints.load(files[0], folder, device=device)


def _images(batch: int, channels: int, side: int) -> torch.Tensor:
    return torch.rand(batch, channels, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _mel(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 80, 16, generator=torch.Generator().manual_seed(1))


def _forward(model: Callable, inputs: tuple) -> object:
    return model(*inputs)


class Network(NamedTuple):
    """One network as the benchmarks time it, on the CPU's tensors of its inputs."""

    files: tuple[str, ...]  # its checkpoint files, the first one's loader builds it
    inputs: Callable[[int, int], tuple]  # (batch, image side) -> the forward call's tensors
    side: int  # the image side the pipeline feeds it
    quick_side: int  # a small side it accepts, for quick runs (gpu.py --dry-run); fixed-size ones: side
    forward: Callable = _forward


# golden/timing name -> the network
NETWORKS: dict[str, Network] = {
    "LNet": Network(("LNet.pth",), lambda b, s: (_mel(b), _images(b, 6, s)), 96, 48),
    "ENet": Network(
        ("ENet.pth", "LNet.pth"),
        lambda b, s: (_mel(b), _images(b, 6, s)),
        384,
        48,
        lambda m, x: m(x[0], x[1], x[1][:, 3:], generator=torch.Generator().manual_seed(0)),
    ),
    "DNet": Network(("DNet.pt",), lambda b, s: (_images(b, 3, s), torch.randn(b, 73, 26)), 256, 64),
    "face3d_recon": Network(("face3d_pretrain_epoch_20.pth",), lambda b, s: (_images(b, 3, s),), 224, 32),
    "GFPGANv1.3": Network(("GFPGANv1.3.pth",), lambda b, s: (_images(b, 3, s),), 512, 512),
    "GPEN-BFR-512": Network(("GPEN-BFR-512.pth",), lambda b, s: (_images(b, 3, s),), 512, 512),
    "ParseNet": Network(("ParseNet-latest.pth",), lambda b, s: (_images(b, 3, s),), 512, 32),
    "RetinaFace-R50": Network(("RetinaFace-R50.pth",), lambda b, s: (_images(b, 3, s) * 128,), 256, 32),
    "S3FD": Network(("s3fd-619a316812.pth",), lambda b, s: (_images(b, 3, s) * 128,), 700, 32),
    "GANimation_gen": Network(
        ("30_net_gen.pth",), lambda b, s: (_images(b, 3, s), torch.rand(b, 17)), 128, 32
    ),
}


def time_forward(
    model: torch.nn.Module,
    call: Callable,
    inputs: tuple,
    repeat: int,
    *,
    warmup: int = 1,
    precision: str = "fp32",
) -> float:
    """Median seconds of ``repeat`` forward passes after ``warmup`` untimed ones, under ``precision``'s
    autocast on the inputs' device; on CUDA each pass is waited for (kernels run asynchronously)."""
    device = inputs[0].device
    wait = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = []
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(warmup):
            call(model, inputs)
        wait()
        for _ in range(repeat):
            start = time.perf_counter()
            call(model, inputs)
            wait()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=SYNTHETIC)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timing = default_reference_timing()
    reference = json.loads(timing.read_text()) if timing.is_file() else {}

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), CPU, median of {args.repeat} after 1 warm-up"
    )
    print(
        f"{'network':<16}"
        + "".join(f"{f'batch {b} s':>12}{'s/item':>9}" for b in args.batch)
        + f"{'reference b1 s':>16}"
    )
    for name in args.only:
        network = NETWORKS[name]
        checkpoints.synth(args.checkpoints, network.files)
        model = build_network(network.files, args.checkpoints)
        cells = []
        for batch in args.batch:
            inputs = network.inputs(batch, network.side)
            seconds = time_forward(model, network.forward, inputs, args.repeat)
            cells.append(f"{seconds:>12.3f}{seconds / batch:>9.3f}")
        ref = reference.get(name, {}).get("median_s")
        print(f"{name:<16}" + "".join(cells) + (f"{ref:>16.3f}" if ref else f"{'-':>16}"), flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-network CPU forward time at batch 1 and 8, through the real loaders on synthetic checkpoints.

    python benchmarks/models.py [--checkpoints DIR] [--batch 1 8] [--repeat 3] [--threads 2] [--only LNet ...]

The checkpoints are written by ``retalk.registry.synth`` (cached between runs). The reference column is
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

import platformdirs
import torch

from retalk import checkpoints as registry
from retalk.commands.bench import default_reference_timing


def _build(files: tuple[str, ...], checkpoints: Path) -> torch.nn.Module:
    """The network through the registry's loader for its first file (E-Net's also reads LNet.pth)."""
    return registry.resolve_loader(registry.CHECKPOINTS[files[0]])(
        *(checkpoints / f for f in files), device="cpu"
    )


def _images(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _forward(model: Callable, inputs: tuple) -> object:
    return model(*inputs)


# golden/timing name -> (checkpoint files, inputs for a batch size, forward call)
NETWORKS: dict[str, tuple[tuple[str, ...], Callable[[int], tuple], Callable]] = {
    "LNet": (("LNet.pth",), lambda b: (torch.randn(b, 1, 80, 16), _images(b, 6, 96)), _forward),
    "ENet": (
        ("ENet.pth", "LNet.pth"),
        lambda b: (torch.randn(b, 1, 80, 16), _images(b, 6, 384)),
        lambda m, x: m(x[0], x[1], x[1][:, 3:], generator=torch.Generator().manual_seed(0)),
    ),
    "DNet": (("DNet.pt",), lambda b: (_images(b, 3, 256), torch.randn(b, 73, 26)), _forward),
    "face3d_recon": (("face3d_pretrain_epoch_20.pth",), lambda b: (_images(b, 3, 224),), _forward),
    "GFPGANv1.3": (("GFPGANv1.3.pth",), lambda b: (_images(b, 3, 512),), _forward),
    "GPEN-BFR-512": (("GPEN-BFR-512.pth",), lambda b: (_images(b, 3, 512),), _forward),
    "ParseNet": (("ParseNet-latest.pth",), lambda b: (_images(b, 3, 512),), _forward),
    "RetinaFace-R50": (("RetinaFace-R50.pth",), lambda b: (_images(b, 3, 256) * 128,), _forward),
    "S3FD": (("s3fd-619a316812.pth",), lambda b: (_images(b, 3, 700) * 128,), _forward),
    "GANimation_gen": (("30_net_gen.pth",), lambda b: (_images(b, 3, 128), torch.rand(b, 17)), _forward),
}


def time_forward(model: torch.nn.Module, call: Callable, inputs: tuple, repeat: int) -> float:
    """Median seconds of ``repeat`` forward passes after one warm-up."""
    times = []
    with torch.inference_mode():
        call(model, inputs)
        for _ in range(repeat):
            start = time.perf_counter()
            call(model, inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoints", type=Path, default=Path(platformdirs.user_cache_dir("retalk")) / "synthetic"
    )
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
        files, make_inputs, call = NETWORKS[name]
        registry.synth(args.checkpoints, files)
        model = _build(files, args.checkpoints)
        cells = []
        for batch in args.batch:
            seconds = time_forward(model, call, make_inputs(batch), args.repeat)
            cells.append(f"{seconds:>12.3f}{seconds / batch:>9.3f}")
        ref = reference.get(name, {}).get("median_s")
        print(f"{name:<16}" + "".join(cells) + (f"{ref:>16.3f}" if ref else f"{'-':>16}"), flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark: each network's forward time at fp32, bf16 and fp16 and several batch sizes, and the re-dub
of a generated 1080p clip end to end (neural engine), first take and second take (the video's stages cached),
in frames per second; all on synthetic checkpoints (``retalk models synth``), so nothing is downloaded.

    python benchmarks/gpu.py [--batch 1 4 16] [--precision fp32 bf16 fp16] [--seconds 2] [--budget-seconds 540]
    python benchmarks/gpu.py --dry-run

It needs a CUDA device and the project installed, nothing else. It measures the end-to-end takes first,
each precision while less than half the budget is spent, then the networks, every network at the smallest
batch before any larger one; what the budget leaves unmeasured prints as ``-``. ``--dry-run`` runs every
step on the CPU at toy sizes (fp32, batch 1, one pass per network at a small input, 4 frames of 320x240
through the preview engine: the neural engine takes about a minute a frame on 2 CPU cores), to check the
script, not to measure.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from models import NETWORKS, SYNTHETIC, build_network, time_forward

from retalk import checkpoints, media
from retalk.bench import run_bench
from retalk.device import PRECISIONS
from retalk.pipeline.sample import write_sample_clip, write_sample_speech

UNMEASURED = math.nan  # a cell the budget left out (printed as "-")


class Budget:
    """Wall-clock seconds from the start of the run: measuring stops when they run out."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start

    def allows(self, fraction: float = 1.0) -> bool:
        """Whether less than ``fraction`` of the budget is spent."""
        return self.spent() < fraction * self.seconds


def end_to_end(
    folder: Path,
    *,
    engine: str,
    device: str,
    precisions: list[str],
    checkpoints_dir: Path,
    size: tuple[int, int],
    seconds: float,
    budget: Budget,
) -> tuple[int, dict[str, tuple[float, float]]]:
    """The clip's frame count, and each precision's first and second take (:func:`retalk.bench.run_bench`) of
    the re-dub of a generated clip of ``size`` (the sample shot, ``seconds`` long) with a sample line of speech,
    in frames per second of the pipeline's stages; a precision starts while less than half the budget is spent."""
    video = write_sample_clip(folder / "clip.mp4", seconds=seconds, size=size)
    audio = folder / "speech.wav"
    write_sample_speech(audio)
    rates = {}
    for precision in precisions:
        if not budget.allows(0.5):
            rates[precision] = (UNMEASURED, UNMEASURED)
            continue
        takes = folder / precision  # each precision's first take prepares the video anew
        takes.mkdir()
        results = run_bench(
            video,
            audio,
            takes,
            engine=engine,
            codec="h264",
            long_seconds=None,
            checkpoints=checkpoints_dir,
            device=device,
            precision=precision,
        )
        first, second = (
            results[t]["frames"] / sum(results[t]["stage_seconds"].values()) for t in ("first", "second")
        )
        rates[precision] = (first, second)
    return media.probe(video).frame_count, rates


def network_times(
    checkpoints_dir: Path,
    *,
    device: torch.device,
    precisions: list[str],
    batches: list[int],
    quick: bool,
    repeat: int,
    warmup: int,
    budget: Budget,
) -> dict[tuple[str, str, int], float]:
    """Median ms per forward pass by (network, precision, batch): every network at the smallest batch first,
    so that the budget cuts the larger batches (cells it cuts are ``UNMEASURED``)."""
    models: dict[str, torch.nn.Module] = {}
    times = {}
    for batch in sorted(batches):
        for name, net in NETWORKS.items():
            times.update({(name, precision, batch): UNMEASURED for precision in precisions})
            if not budget.allows():
                continue
            if name not in models:
                models[name] = build_network(net.files, checkpoints_dir, device)
            inputs = tuple(t.to(device) for t in net.inputs(batch, net.quick_side if quick else net.side))
            for precision in precisions:
                if budget.allows():
                    seconds = time_forward(
                        models[name], net.forward, inputs, repeat, warmup=warmup, precision=precision
                    )
                    times[name, precision, batch] = seconds * 1000
    return times


def _cell(value: float, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.2f}"


def format_networks(
    times: dict[tuple[str, str, int], float], precisions: list[str], batches: list[int]
) -> str:
    lines = [
        f"{'network':<16}{'precision':>10}"
        + "".join(f"{f'batch {b} ms':>14}{'ms/item':>10}" for b in batches)
    ]
    for name in NETWORKS:
        for precision in precisions:
            cells = [times[name, precision, b] for b in batches]
            lines.append(
                f"{name:<16}{precision:>10}"
                + "".join(_cell(ms, 14) + _cell(ms / b, 10) for ms, b in zip(cells, batches, strict=True))
            )
    return "\n".join(lines)


def format_end_to_end(rates: dict[str, tuple[float, float]]) -> str:
    lines = [f"{'precision':<10}{'first take frames/s':>22}{'second take frames/s':>22}"]
    for precision, (first, second) in rates.items():
        lines.append(f"{precision:<10}{_cell(first, 22)}{_cell(second, 22)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on the CPU at toy sizes (about a minute): a check, not a measurement",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes of the networks"
    )
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument(
        "--repeat", type=int, default=10, help="timed passes per cell (the median is printed)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the generated 1080p clip")
    parser.add_argument("--checkpoints", type=Path, default=SYNTHETIC, help="where the synthetic files go")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=540.0,
        help="stop measuring (and print what was measured) after this many seconds",
    )
    args = parser.parse_args()
    if min(args.batch) < 1 or args.repeat < 1:
        parser.error("--batch and --repeat take whole numbers from 1 up")
    budget = Budget(args.budget_seconds)
    if args.dry_run:
        device, engine, size, seconds = torch.device("cpu"), "preview", (320, 240), 4 / 25
        precisions, batches, repeat, warmup = ["fp32"], [1], 1, 0
    else:
        if not torch.cuda.is_available():
            print(
                "benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
                "run it on a CUDA machine, or add --dry-run to check it on the CPU",
                file=sys.stderr,
            )
            return 1
        device, engine, size, seconds = torch.device("cuda"), "neural", (1920, 1080), args.seconds
        precisions, batches, repeat, warmup = args.precision, sorted(args.batch), args.repeat, 2
    needed = {f for net in NETWORKS.values() for f in net.files}
    if engine == "neural":
        needed |= {spec.name for spec in checkpoints.CHECKPOINTS.values() if spec.required}
    checkpoints.synth(args.checkpoints, sorted(needed))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, synthetic checkpoints in {args.checkpoints}", flush=True)

    with tempfile.TemporaryDirectory(prefix="retalk-gpu-bench-") as folder:
        frames, rates = end_to_end(
            Path(folder),
            engine=engine,
            device=device.type,
            precisions=precisions,
            checkpoints_dir=args.checkpoints,
            size=size,
            seconds=seconds,
            budget=budget,
        )
    print(
        f"\nend to end: {engine} engine, {size[0]}x{size[1]}, {frames} frames at 25 fps, the pipeline's stages per take"
    )
    print(format_end_to_end(rates), flush=True)

    times = network_times(
        args.checkpoints,
        device=device,
        precisions=precisions,
        batches=batches,
        quick=args.dry_run,
        repeat=repeat,
        warmup=warmup,
        budget=budget,
    )
    sides = "small inputs" if args.dry_run else "the pipeline's input sizes"
    print(f"\nnetworks: median ms of {repeat} forward passes after {warmup} warm-up, {sides}")
    print(format_networks(times, precisions, batches))
    if any(math.isnan(v) for v in [*times.values(), *(r for pair in rates.values() for r in pair)]):
        print(f"- : not measured, the {args.budget_seconds:.0f} s budget ran out (--budget-seconds)")
    print(f"total {budget.spent():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

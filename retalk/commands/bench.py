"""``retalk bench``: time per frame of each stage, first take and second take (cached), and peak memory for
a short and a long output (memory must not grow with the length of the clip)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile

from retalk import media
from retalk.pipeline import RedubRequest, redub
from retalk.pipeline.request import CODECS, ENGINES
from retalk.pipeline.sample import write_sample_clip, write_sample_speech


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time each stage and measure peak memory (short vs long clip)"
    )
    parser.add_argument("--video", type=Path, help="default: a 5 s sample shot made on the spot")
    parser.add_argument("--audio", type=Path, help="default: a sample line of speech")
    parser.add_argument("--start", type=int, default=0, help="first frame of the video range")
    parser.add_argument(
        "--end", type=int, help="end frame (exclusive) of the video range; default: the clip's end"
    )
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--checkpoints", type=Path, help="folder of the official (or synthetic) checkpoints")
    parser.add_argument("--codec", choices=CODECS, default="h264")
    parser.add_argument("--long", type=float, default=60.0, help="seconds of the long take (the clip loops)")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    parser.set_defaults(func=run)


def _take(request: RedubRequest) -> dict:
    """One re-dub in this (fresh) process: its stage times, frame count and the process's peak RSS."""
    result = redub(request)
    return {
        "frames": result.frames,
        "engine": result.engine,
        "stage_seconds": result.stage_seconds,
        "cache_hits": result.cache_hits,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }


def _in_fresh_process(request: RedubRequest) -> dict:
    """Peak RSS only means something per process: every take gets its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_take, request).result()


def run_bench(
    video: Path,
    audio: Path,
    folder: Path,
    *,
    engine: str,
    codec: str,
    long_seconds: float,
    start: int = 0,
    end: int | None = None,
    checkpoints: Path | None = None,
) -> dict:
    """First and second take of ``video`` re-dubbed with ``audio``, then a take ``long_seconds`` long (the
    audio looped, the video looped to follow it with --fit audio), all with one cache folder."""
    request = RedubRequest(
        video=video,
        audio=audio,
        output=folder / f"bench{media.default_extension(codec)}",
        start=start,
        end=end,
        engine=engine,
        checkpoints=checkpoints,
        codec=codec,
        cache_dir=folder / "cache",
    )
    first = _in_fresh_process(request)
    second = _in_fresh_process(request)
    wav = media.read_audio(audio, sample_rate=16000)
    repeats = int(np.ceil(long_seconds * 16000 / max(len(wav), 1)))
    long_audio = folder / "long.wav"
    soundfile.write(long_audio, np.tile(wav, repeats)[: round(long_seconds * 16000)], 16000)
    short = _in_fresh_process(replace(request, fit="audio"))
    long = _in_fresh_process(replace(request, audio=long_audio, fit="audio", extend="loop"))
    return {"video": str(video), "first": first, "second": second, "short": short, "long": long}


def format_report(results: dict) -> str:
    first, second = results["first"], results["second"]
    stages = list(dict.fromkeys([*first["stage_seconds"], *second["stage_seconds"]]))
    lines = [
        f"{results['video']}: {first['frames']} frames, {first['engine']} engine",
        f"{'stage':<10}{'first take ms/frame':>22}{'second take ms/frame':>22}",
    ]
    for stage in stages:
        a, b = (take["stage_seconds"].get(stage, 0.0) * 1000 / take["frames"] for take in (first, second))
        lines.append(f"{stage:<10}{a:>22.2f}{b:>22.2f}")
    total = [sum(t["stage_seconds"].values()) * 1000 / t["frames"] for t in (first, second)]
    lines.append(f"{'total':<10}{total[0]:>22.2f}{total[1]:>22.2f}")
    lines.append(f"second take cache hits: {', '.join(second['cache_hits']) or 'none'}")
    for name in ("short", "long"):
        take = results[name]
        lines.append(f"peak RSS, {take['frames']:>5} output frames: {take['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="retalk-bench-") as tmp:
        folder = Path(tmp)
        video, audio = args.video, args.audio
        if video is None:
            video = write_sample_clip(folder / "sample.mp4", seconds=5.0)
        if audio is None:
            audio = folder / "speech.wav"
            note = write_sample_speech(audio)
            if note:
                print(f"retalk: warning: {note}", file=sys.stderr)
        results = run_bench(
            video,
            audio,
            folder,
            engine=args.engine,
            codec=args.codec,
            long_seconds=args.long,
            start=args.start,
            end=args.end,
            checkpoints=args.checkpoints,
        )
    print(json.dumps(results) if args.json else format_report(results))
    return 0

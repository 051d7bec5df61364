"""``retalk bench``: the measurements of :mod:`retalk.bench` on a clip (default: a sample shot made on the spot),
printed as tables or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from retalk_protocol.options import JOB_OPTIONS

from retalk.bench import default_reference_timing, format_report, reference_costs, run_bench
from retalk.commands import add_command
from retalk.errors import InputError
from retalk.pipeline.request import CODECS, ENGINES
from retalk.pipeline.sample import write_sample_clip, write_sample_speech


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "bench")
    parser.add_argument("--video", type=Path, help="default: a 5 s sample shot made on the spot")
    parser.add_argument("--audio", type=Path, help="default: a sample line of speech")
    parser.add_argument("--start", type=int, default=0, help="first frame of the video range")
    parser.add_argument(
        "--end", type=int, help="end frame (exclusive) of the video range; default: the clip's end"
    )
    parser.add_argument("--engine", choices=ENGINES, default="auto")
    parser.add_argument("--checkpoints", type=Path, help="folder of the official (or synthetic) checkpoints")
    parser.add_argument("--codec", choices=CODECS, default="h264")
    backend = JOB_OPTIONS["backend"]
    parser.add_argument(backend.flag, choices=backend.choices, default=backend.default, help=backend.help)
    parser.add_argument(
        "--long", type=float, default=60.0, help="seconds of the long take (the clip loops); 0: no long take"
    )
    parser.add_argument(
        "--reference-timing",
        type=Path,
        help="the reference's per-network timings; default: $RETALK_SHARED/reference/timing.json",
    )
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    parser.add_argument(
        "--sheet", type=Path, help="write a PNG contact sheet of source and output mouths (second take)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timing = args.reference_timing or default_reference_timing()
    if args.reference_timing is not None and not timing.is_file():
        raise InputError(f"--reference-timing {timing}: no such file")
    reference = reference_costs(timing)  # before the takes: a bad file fails in a second, not in minutes
    if args.sheet is not None and (args.sheet.suffix.lower() != ".png" or not args.sheet.parent.is_dir()):
        raise InputError(f"--sheet {args.sheet}: expected a .png file in an existing folder")
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
            long_seconds=args.long or None,
            start=args.start,
            end=args.end,
            checkpoints=args.checkpoints,
            backend=args.backend,
            sheet=args.sheet,
        )
    results["reference"] = reference
    print(json.dumps(results) if args.json else format_report(results))
    return 0

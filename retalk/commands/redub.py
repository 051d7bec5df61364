"""``retalk redub``: re-dub a range of a video with a new line of audio."""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

from retalk_protocol import options as job_options

from retalk.commands import add_command
from retalk.device import PRECISIONS
from retalk.errors import InputError, RetalkError
from retalk.pipeline import RedubRequest, redub
from retalk.progress import JsonLines, StageBars

NO_FACE = 3  # exit status: the file was written, but no frame had a face, so it is the source unchanged
EXIT_STATUS = (
    "exit status: 0 the re-dub was written; 3 it was written but no face was found in any frame (the output is "
    "the source); 1 an error, told in one line, and nothing written; 2 a usage error; 130 interrupted"
)


def add_render_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``redub`` and ``demo`` (everything after the inputs): the job options of
    ``retalk_protocol.options``, then where the work runs."""
    job_options.add_arguments(parser)
    parser.add_argument("--checkpoints", type=Path, help="folder with the official checkpoint files")
    add_device_options(
        parser,
        precision_help="the networks' arithmetic: fp32 (default), bf16, or fp16 on CUDA "
        "(faster, slightly different)",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: the user cache folder")
    parser.add_argument(
        "--json", action="store_true", help="JSON lines on stdout: progress events, then the result"
    )


def add_device_options(parser: argparse.ArgumentParser, *, precision_help: str) -> None:
    """Where the networks run and in which arithmetic: ``--device`` and ``--precision`` (redub, demo and
    selftest take them)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help=precision_help)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "redub", epilog=EXIT_STATUS)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--start", type=int, default=0, help="first frame (inclusive)")
    parser.add_argument("--end", type=int, help="end frame (exclusive); default: the end of the clip")
    parser.add_argument("--audio-offset", default="0", help="seconds into the audio where the line starts")
    add_render_options(parser)
    parser.set_defaults(func=run)


def request_from_args(args: argparse.Namespace, **inputs) -> RedubRequest:
    return RedubRequest(
        **inputs,
        engine=args.engine,
        checkpoints=args.checkpoints,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
        **job_options.from_arguments(args),
    )


def run_request(request: RedubRequest, as_json: bool) -> int:
    """Run with progress bars (or JSON lines), print warnings on stderr and the outcome; the exit status."""
    if as_json:
        reporter = JsonLines()
        try:
            result = redub(request, progress=reporter)
        except RetalkError as err:
            reporter.write({"event": "error", "type": type(err).__name__, "message": str(err)})
            raise
        reporter.write({"event": "result", **result.to_json()})
    else:
        bars = StageBars()
        try:
            result = redub(request, progress=bars)
        finally:
            bars.close()
    for warning in result.warnings:
        print(f"retalk: warning: {warning}", file=sys.stderr)
    if not as_json:
        print(
            f"{result.output}: {result.frames} frames, {float(result.duration):.3f} s, {result.engine} engine"
        )
    return NO_FACE if result.faceless_ranges == [(0, result.frames)] else 0


def run(args: argparse.Namespace) -> int:
    try:
        offset = Fraction(args.audio_offset)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"--audio-offset {args.audio_offset!r}: expected seconds, e.g. 1.5") from None
    request = request_from_args(
        args,
        video=args.video,
        audio=args.audio,
        output=args.output,
        start=args.start,
        end=args.end,
        audio_offset=offset,
    )
    return run_request(request, args.json)

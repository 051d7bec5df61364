"""``retalk demo``: make a sample shot and a line of speech, and re-dub the one with the other."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from retalk import media
from retalk.commands import add_command
from retalk.commands.redub import add_render_options, request_from_args, run_request
from retalk.errors import InputError
from retalk.pipeline.sample import SAMPLE_TEXT, write_sample_clip, write_sample_speech


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo")
    parser.add_argument("-o", "--output", type=Path, default=Path("retalk-demo.mp4"))
    parser.add_argument("--text", default=SAMPLE_TEXT, help="what the sample voice says (espeak-ng)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the sample shot (it loops)")
    add_render_options(parser)
    parser.set_defaults(func=run, fit="audio")  # show the whole line: the shot loops while the speech lasts


def run(args: argparse.Namespace) -> int:
    if not 0 < args.seconds <= 60:
        raise InputError(f"--seconds {args.seconds}: expected a length in (0, 60]")
    media.check_output(args.output, args.codec)  # before making the sample
    with tempfile.TemporaryDirectory(prefix="retalk-demo-") as folder:
        video, audio = Path(folder) / "sample.mp4", Path(folder) / "speech.wav"
        print(f"retalk: making a {args.seconds:g} s sample shot and a line of speech", file=sys.stderr)
        write_sample_clip(video, seconds=args.seconds)
        note = write_sample_speech(audio, args.text)
        if note:
            print(f"retalk: warning: {note}", file=sys.stderr)
        request = request_from_args(args, video=video, audio=audio, output=args.output)
        return run_request(request, args.json)

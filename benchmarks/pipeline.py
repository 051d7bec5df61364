"""Re-dub pipeline benchmark (a script, not a test): per-stage time per frame (first take, second take from the
cache) and peak RSS of each take and of a short and a 60 s take on the shared clips, next to the reference's
network seconds per frame (../shared/reference/timing.json). The preview engine runs on both clips, plus the
preview renderer's speed per frame at 720p and 1080p on one thread; the neural engine runs on the first
``--frames`` frames of face1.mp4 (about 10 s a frame on 2 CPU cores; its short and long takes loop those frames
over the 5 s speech and ``--long`` seconds, so pick ``--long`` with that cost in mind).

    python benchmarks/pipeline.py [--long 60] [--codec h264]
    python benchmarks/pipeline.py --engine neural --checkpoints DIR [--frames 16] [--long 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from retalk import media
from retalk.bench import default_reference_timing, format_report, reference_costs, run_bench
from retalk.engines.preview import render_frame
from retalk.shared import shared_dir
from retalk.tracking import track_faces

SHARED = shared_dir() / "media"


def preview_speed(clip: Path, height: int, repeats: int = 30) -> float:
    """ms per frame of ``render_frame`` with the clip's first frame scaled to ``height`` in a 16:9 frame."""
    frame = media.read_frames(clip, 0, 1)[0]
    landmarks = track_faces([frame]).landmarks[0]
    scale = height / frame.shape[0]
    side = round(frame.shape[1] * scale)
    canvas = np.zeros((height, height * 16 // 9, 3), np.uint8)
    left = (canvas.shape[1] - side) // 2
    canvas[:, left : left + side] = cv2.resize(frame, (side, height), interpolation=cv2.INTER_AREA)
    points = landmarks * scale + [left, 0]
    render_frame(canvas, points, 0.5, 0.0)  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        render_frame(canvas, points, (i % 10) / 10, 0.3)
    return (time.perf_counter() - start) / repeats * 1000


def neural(checkpoints: Path, frames: int, long_seconds: float, codec: str, reference: dict) -> None:
    """The neural engine on face1.mp4's first ``frames`` frames, re-dubbed with the shared speech."""
    with tempfile.TemporaryDirectory(prefix="retalk-bench-") as folder:
        results = run_bench(
            SHARED / "face1.mp4",
            SHARED / "speech1.wav",
            Path(folder),
            engine="neural",
            codec=codec,
            long_seconds=long_seconds,
            end=frames,
            checkpoints=checkpoints,
        )
    print(format_report({**results, "reference": reference}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("preview", "neural"), default="preview")
    parser.add_argument(
        "--checkpoints", type=Path, help="official (or synthetic) checkpoints, for --engine neural"
    )
    parser.add_argument("--frames", type=int, default=16, help="face1.mp4 frames the neural engine re-dubs")
    parser.add_argument("--long", type=float, default=60.0)
    parser.add_argument("--codec", default="h264")
    args = parser.parse_args()
    reference = reference_costs(default_reference_timing())
    if args.engine == "neural":
        if args.checkpoints is None:
            parser.error("--engine neural needs --checkpoints DIR")
        neural(args.checkpoints, args.frames, args.long, args.codec, reference)
        return
    cv2.setNumThreads(1)
    speech = SHARED / "speech1.wav"
    for name in ("face1.mp4", "face2.mp4"):
        for height in (720, 1080):
            print(
                f"preview render_frame, {name} face at {height}p: {preview_speed(SHARED / name, height):.1f} ms/frame"
            )
    for name in ("face1.mp4", "face2.mp4"):
        with tempfile.TemporaryDirectory(prefix="retalk-bench-") as folder:
            results = run_bench(
                SHARED / name,
                speech,
                Path(folder),
                engine="preview",
                codec=args.codec,
                long_seconds=args.long,
            )
        print(format_report({**results, "reference": reference}))


if __name__ == "__main__":
    main()

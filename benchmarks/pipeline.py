"""Re-dub pipeline benchmark (a script, not a test): per-stage time per frame (first take, second take from the
cache) and peak RSS of each take and of a short and a 60 s take on the shared clips, next to the reference's
network seconds per frame (../shared/reference/timing.json). The preview engine runs on both clips, plus the
preview renderer's speed per frame at 720p and 1080p on one thread; the neural engine runs on the first
``--frames`` frames of face1.mp4 (about 10 s a frame on 2 CPU cores; its short and long takes loop those frames
over the 5 s speech and ``--long`` seconds, so pick ``--long`` with that cost in mind). ``--takes`` measures
what a user waits for instead: the whole ``retalk redub --engine preview --json`` process on a 720p clip (face1
scaled and padded to 1280x720, ping-ponged to 250 frames, no audio) with 10 s of the shared speech (its 5 s
twice), first take into an empty cache folder and second take from it, as frames per second of wall time (best
of ``--runs``).

    python benchmarks/pipeline.py [--long 60] [--codec h264]
    python benchmarks/pipeline.py --engine neural --checkpoints DIR [--frames 16] [--long 60]
    python benchmarks/pipeline.py --takes [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import wave
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


TAKE_SIZE = (1280, 720)
TAKE_FRAMES = 250
TAKE_SPEECH_SECONDS = 10


def make_take_inputs(folder: Path) -> tuple[Path, Path]:
    """The ``--takes`` clip (face1 scaled to 720 rows, centred on a black 1280x720 frame, played forward and
    back to TAKE_FRAMES frames, no audio) and TAKE_SPEECH_SECONDS of the shared speech (repeated) as 16-bit WAV."""
    source = SHARED / "face1.mp4"
    info = media.probe(source)
    frames = media.read_frames(source, 0, info.frame_count)
    width, height = TAKE_SIZE
    side = round(info.width * height / info.height)
    canvas = np.zeros((len(frames), height, width, 3), np.uint8)
    left = (width - side) // 2
    for frame, out in zip(frames, canvas, strict=True):
        out[:, left : left + side] = cv2.resize(frame, (side, height), interpolation=cv2.INTER_CUBIC)
    forth_and_back = np.r_[np.arange(len(frames)), np.arange(len(frames) - 2, 0, -1)]
    order = np.resize(forth_and_back, TAKE_FRAMES)
    video = folder / "face1-720p.mp4"
    with media.VideoWriter(video, width=width, height=height, rate=info.rate) as writer:
        for a in range(0, TAKE_FRAMES, 16):
            writer.write(canvas[order[a : a + 16]])
    speech = media.read_audio(SHARED / "speech1.wav", sample_rate=16000)  # 5 s: said twice
    speech = np.resize(speech, TAKE_SPEECH_SECONDS * 16000)
    audio = folder / "speech-10s.wav"
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(speech, -1, 1) * 32767).round().astype("<i2").tobytes())
    return video, audio


def take(video: Path, audio: Path, output: Path, cache: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one ``retalk redub --engine preview --json`` process, and its JSON result."""
    command = [sys.executable, "-m", "retalk", "redub", "--engine", "preview", "--json"]
    command += ["--video", str(video), "--audio", str(audio), "-o", str(output), "--cache-dir", str(cache)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode:
        raise SystemExit(f"retalk redub failed ({done.returncode}): {done.stderr.strip()}")
    result = json.loads(done.stdout.splitlines()[-1])  # JSON lines: progress events, then the result
    return seconds, cpu, result


def takes(runs: int) -> None:
    """Print the first and second take's frames per second (best of ``runs``) and stage seconds, and each
    run's CPU seconds and load (the machine may be shared)."""
    with tempfile.TemporaryDirectory(prefix="retalk-takes-") as folder:
        video, audio = make_take_inputs(Path(folder))
        best: dict[str, tuple[float, dict]] = {}
        for run in range(runs):
            cache = Path(folder) / f"cache{run}"
            for name in ("first", "second"):
                seconds, cpu, result = take(video, audio, Path(folder) / "out.mp4", cache)
                load = os.getloadavg()[0]
                print(
                    f"run {run + 1} {name} take: {TAKE_FRAMES / seconds:.1f} fps ({seconds:.2f} s, "
                    f"CPU {cpu:.2f} s, load {load:.2f})"
                )
                if name not in best or seconds < best[name][0]:
                    best[name] = seconds, result
        for name, (seconds, result) in best.items():
            stages = ", ".join(f"{stage} {value:.2f}" for stage, value in result["stage_seconds"].items())
            print(
                f"best {name} take: {TAKE_FRAMES / seconds:.1f} fps ({seconds:.2f} s); stage seconds: {stages}"
            )


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
    parser.add_argument("--takes", action="store_true", help="first and second take fps at 720p, then stop")
    parser.add_argument("--runs", type=int, default=3, help="--takes: runs of both takes (the best is kept)")
    args = parser.parse_args()
    if args.takes:
        takes(args.runs)
        return
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

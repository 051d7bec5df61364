"""Render farm benchmark (a script, not a test): frames per second of one job against the number of farm workers,
the share of the job spent splitting it (the whole-range preparation before the segments, the joining after
them), and the fixed cost of a worker's first segment of a job (the job prepared again from the cache) that the
default ``--segment-frames`` is chosen against.

Each worker is a Ray node of one CPU and one fake GPU, so N workers need N cores to show a speed-up; Ray runs in
a network namespace that has only loopback, so the script re-runs itself in one (root, like ``pytest -m ray``).

    python benchmarks/farm.py [--workers 1,2] [--frames 135] [--segment-frames 32] [--codec lossless]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from retalk import media
from retalk.pipeline import RedubRequest, redub
from retalk.pipeline.redub import prepare
from retalk.pipeline.segments import DEFAULT_SEGMENT_FRAMES, render_segment, segment_path
from retalk.shared import shared_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # farm_support: the namespace and cluster the farm tests use
from farm_support import drive, in_private_network, job_spec, run_in_private_network, start_cluster  # noqa: E402

SHARED = shared_dir() / "media"


def farm_run(workers: int, frames: int, segment_frames: int, codec: str) -> dict:
    """One job, first take (empty stage cache), on ``workers`` one-CPU nodes; seconds of each phase."""
    from retalk_server.ray_pool import RayPool

    cluster, _ = start_cluster(workers)
    folder = Path(tempfile.mkdtemp(prefix="retalk-farm-bench-"))
    pool = RayPool(cluster.address, state_dir=folder / "state", device="cpu", segment_frames=segment_frames)
    try:
        marks: dict[str, float] = {}

        def mark(pool, events):
            for event in events:
                if event.kind == "progress":
                    marks.setdefault(event.data["stage"], time.perf_counter())

        ready = time.perf_counter()
        while sum(w["ready"] for w in pool.describe()) < workers:  # every worker up before the clock starts
            pool.poll()
            time.sleep(0.1)
        start = time.perf_counter()
        output = folder / "job" / f"out{media.default_extension(codec)}"
        spec = job_spec(SHARED / "face1.mp4", SHARED / "speech1.wav", output, end=frames, codec=codec)
        _, final = drive(pool, "bench", spec, timeout=3600, on_poll=mark)
        end = time.perf_counter()
        if final.kind != "done":
            raise SystemExit(f"the benchmark job ended {final.kind}: {final.data}")
        render, joined = marks["render"], marks.get("encode", end)
        return {
            "startup": start - ready,
            "total": end - start,
            "prepare": render - start,
            "segments": joined - render,
            "join": end - joined,
        }
    finally:
        pool.close()
        cluster.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def one_process(frames: int, codec: str) -> float:
    with tempfile.TemporaryDirectory(prefix="retalk-farm-bench-") as folder:
        request = RedubRequest(
            video=SHARED / "face1.mp4",
            audio=SHARED / "speech1.wav",
            output=Path(folder) / f"out{media.default_extension(codec)}",
            end=frames,
            engine="preview",
            codec=codec,
            cache_dir=Path(folder) / "cache",
        )
        start = time.perf_counter()
        redub(request)
        return time.perf_counter() - start


def segment_costs(frames: int, codec: str) -> tuple[float, float]:
    """Seconds to prepare the job again from the cache (what a worker pays before its first segment of a job)
    and seconds per rendered and written frame."""
    with tempfile.TemporaryDirectory(prefix="retalk-farm-bench-") as folder:
        request = RedubRequest(
            video=SHARED / "face1.mp4",
            audio=SHARED / "speech1.wav",
            output=Path(folder) / "out.mkv",
            end=frames,
            engine="preview",
            codec=codec,
            cache_dir=Path(folder) / "cache",
        )
        key = prepare(request).clip.content_key
        start = time.perf_counter()
        job = prepare(request, content_key=key)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        render_segment(job, 0, frames, segment_path(Path(folder), codec, 0, frames))
        return setup, (time.perf_counter() - start) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--frames", type=int, default=135, help="frames of face1.mp4 (135: all of it)")
    parser.add_argument("--segment-frames", type=int, default=32)
    parser.add_argument("--codec", default="lossless")
    args = parser.parse_args()
    if not in_private_network():
        sys.exit(run_in_private_network([sys.executable, *sys.argv]).returncode)

    print(
        f"job: preview engine, face1.mp4 frames [0, {args.frames}), {args.codec}, segments of {args.segment_frames}"
    )
    alone = one_process(args.frames, args.codec)
    print(f"one process, no farm: {alone:.1f} s, {args.frames / alone:.1f} frames/s\n")
    print("| workers | job s | frames/s | speed-up | prepare s | segments s | join s | split overhead |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for workers in [int(n) for n in args.workers.split(",")]:
        run = farm_run(workers, args.frames, args.segment_frames, args.codec)
        first = first or run["total"]
        share = (run["prepare"] + run["join"]) / run["total"]
        print(
            f"| {workers} | {run['total']:.1f} | {args.frames / run['total']:.1f} | {first / run['total']:.2f}x "
            f"| {run['prepare']:.1f} | {run['segments']:.1f} | {run['join']:.1f} | {share:.0%} |",
            flush=True,
        )
    setup, per_frame = segment_costs(args.frames, args.codec)
    print(
        f"\na worker's first segment of a job: {setup:.2f} s to prepare the job again from the cache, then "
        f"{per_frame * 1000:.0f} ms a frame"
    )
    for size in (16, 64, DEFAULT_SEGMENT_FRAMES, 1024):
        print(
            f"  a first segment of {size} frames: {setup / (setup + size * per_frame):.0%} of it is that set-up"
        )


if __name__ == "__main__":
    main()

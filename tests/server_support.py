"""Shared by the server tests: a real `retalk serve` process on 127.0.0.1, and a gated runner for faults.

No tests here. The gated runner is the only non-pipeline code a worker runs in the tests: it holds a job
at a gate (so a test can kill the server or a worker mid-job at a known point), then runs the real pipeline.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from mediagen import write_face_clip, write_tone
from retalk_server import Server, ServerConfig
from retalk_server.runner import file_sha256, run_redub
from retalk_server.workers import WorkerEvent

from retalk import media
from retalk.errors import CancelledError

TESTS = Path(__file__).resolve().parent
GATE_ENV = "RETALK_TEST_GATE"
GATED_RUNNER = "server_support:gated_runner"
CLIP_FRAMES = 6


def make_media(folder: Path) -> tuple[Path, Path]:
    """A small face clip (6 frames, 25 fps) and a tone as long as it, inside ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    clip = write_face_clip(folder / "clip.mp4", n_frames=CLIP_FRAMES, size=(160, 160), with_audio=False)
    audio = write_tone(folder / "tone.wav", float(Fraction(CLIP_FRAMES, 25)))
    return clip, audio


class ServerProcess:
    """`python -m retalk serve` in a subprocess; ``endpoint`` is what it bound (port 0 picks a free port)."""

    def __init__(
        self, state_dir: Path, media_root: Path, *args: str, endpoint: str = "tcp://127.0.0.1:0", env=None
    ):
        self.log = state_dir.parent / f"{state_dir.name}-server.log"
        command = [
            sys.executable,
            "-m",
            "retalk",
            "serve",
            "--bind",
            endpoint,
            "--media-root",
            str(media_root),
            "--state-dir",
            str(state_dir),
            "--heartbeat",
            "0.2",
            "--timeout",
            "2",
            *args,
        ]
        environment = dict(os.environ, **(env or {}))
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH")]))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=environment)
        self.endpoint = self._wait_for_endpoint(timeout=120)

    def _wait_for_endpoint(self, timeout: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = self.process.stdout.readline().decode()
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
            if self.process.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"the server did not start; its log: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def gated_runner(spec: dict, progress, should_cancel) -> dict:
    """Announce the attempt (file ``started-<pid>-<n>`` in the gate folder), wait for ``open``, run for real."""
    gate = Path(os.environ[GATE_ENV])
    marker = gate / f"started-{os.getpid()}-{time.monotonic_ns()}"
    marker.write_text(Path(spec["video"]).name)
    progress("gate", 0, 1, "waiting at the test gate")
    while not (gate / "open").exists():
        if should_cancel():
            raise CancelledError("cancelled at the gate")
        time.sleep(0.05)
    return run_redub(spec, progress, should_cancel)


def started_markers(gate: Path) -> list[Path]:
    return sorted(gate.glob("started-*"), key=lambda p: p.stat().st_mtime_ns)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def server_in_thread(config: ServerConfig, pool) -> Iterator[Server]:
    """An in-process server with the given worker pool, serving on a thread until the block ends."""
    server = Server(config, pool=pool)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join()
        server.close()


class IdlePool:
    """A worker pool with no workers: these tests never run a job."""

    def capacity(self) -> int:
        return 0

    def submit(self, job_id: str, spec: dict) -> None:
        raise AssertionError("no job should reach the pool")

    def cancel(self, job_id: str) -> None:
        pass

    def poll(self) -> list:
        return []

    def describe(self) -> list:
        return []

    def wakeups(self) -> list:
        return []

    def close(self) -> None:
        pass


class InstantPool(IdlePool):
    """A pool whose "worker" finishes each job at once, its result a copy of the clip (h264 jobs only)."""

    def __init__(self):
        self.finished: list = []

    def capacity(self) -> int:
        return 1

    def submit(self, job_id: str, spec: dict) -> None:
        output = Path(spec["output"])
        shutil.copy(spec["video"], output)
        info = media.probe(output)
        result = {
            "frames": info.frame_count,
            "rate": [info.rate.numerator, info.rate.denominator],
            "duration": [info.duration.numerator, info.duration.denominator],
            "engine": "copy",
            "codec": "h264",
            "warnings": [],
            "size": output.stat().st_size,
            "sha256": file_sha256(output),
        }
        self.finished.append(WorkerEvent("done", job_id, result))

    def poll(self) -> list:
        events, self.finished = self.finished, []
        return events

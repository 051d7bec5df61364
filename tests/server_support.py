"""Shared by the server and protocol tests: a valid example of every message type and the ways to spoil one, a
real `retalk serve` process on 127.0.0.1, and a gated runner for faults.

No tests here. The gated runner is the only non-pipeline code a worker runs in the tests: it holds a job
at a gate (so a test can kill the server or a worker mid-job at a known point) and otherwise runs the real
pipeline. The gate is before the pipeline starts, or (``GATE_AT_ENV=render``) after the first rendered
frames were written to the partial result file.
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

import msgpack
from mediagen import write_face_clip, write_tone
from retalk_protocol import codec
from retalk_server import JobSpec, Server, ServerConfig
from retalk_server.runner import file_sha256, run_redub
from retalk_server.workers import WorkerEvent

from retalk import media
from retalk.errors import CancelledError

TESTS = Path(__file__).resolve().parent
GATE_ENV = "RETALK_TEST_GATE"
GATE_AT_ENV = "RETALK_TEST_GATE_AT"  # "start" (default) or "render"
GATED_RUNNER = "server_support:gated_runner"
CLIP_FRAMES = 6


# One valid example of every message type (§9), built from the spec's tables.
_WELCOME = {
    "version": 1,
    "server": "retalk",
    "engines": ["preview"],
    "formats": ["rgb8"],
    "codecs": ["h264"],
    "options": [],
    "limits": {},
    "heartbeat": 1.0,
    "timeout": 10,
    "retention": 60.0,
}
_STATUS = {
    "server": "retalk",
    "queue": [],
    "workers": [],
    "devices": ["cpu"],
    "jobs": {},
    "clients": 1,
    "streams": 0,
    "uptime": 2.5,
}
_PROGRESS = {
    "job": "j",
    "state": "running",
    "stage": "render",
    "done": 1,
    "total": 4,
    "eta": None,
    "attempt": 1,
    "error": None,
    "result": None,
}
EXAMPLES = {
    "HELLO": ({"versions": [1], "client": "test"}, 0),
    "WELCOME": (_WELCOME, 0),
    "UPLOAD": ({"name": "a.wav", "size": 10, "sha256": "0" * 64}, 0),
    "UPLOAD_READY": ({"upload": "u", "chunk": 1024, "credit": 4}, 0),
    "UPLOAD_CHUNK": ({"upload": "u", "offset": 0}, 1),
    "UPLOAD_ACK": ({"upload": "u", "received": 5}, 0),
    "UPLOADED": ({"upload": "u", "size": 10}, 0),
    "SUBMIT": ({"clip": {"path": "a.mp4"}, "audio": {"upload": "u"}, "rate": [1350, 61], "end": None}, 0),
    "ACCEPTED": ({"job": "j", "position": 0}, 0),
    "PROGRESS": (_PROGRESS, 0),
    "WATCH": ({"job": "j"}, 0),
    "STATUS": ({}, 0),
    "STATUS_REPLY": (_STATUS, 0),
    "LIST": ({"states": ["done"], "job": "j", "limit": 5}, 0),
    "JOBS": ({"jobs": [], "more": False}, 0),
    "CANCEL": ({"job": "j"}, 0),
    "CANCELLED": ({"job": "j", "state": "cancelled"}, 0),
    "RENDER": ({"job": "j", "first": 0, "last": None, "format": "rgb16", "credit": 4}, 0),
    "FETCH": ({"job": "j", "credit": 2}, 0),
    "STREAM": ({"stream": "s", "job": "j", "credit": 4, "frames": 3, "rate": [25, 1]}, 0),
    "AUDIO": ({"stream": "s", "rate": 48000, "channels": 1, "sample": 0, "format": "f32le"}, 1),
    "FRAME": (
        {"stream": "s", "index": 3, "time": [3, 25], "width": 2, "height": 1, "format": "rgb8"},
        1,
    ),
    "CHUNK": ({"stream": "s", "offset": 0}, 1),
    "END": ({"stream": "s", "count": 3}, 0),
    "CREDIT": ({"stream": "s", "credit": 2}, 0),
    "ABORT": ({"stream": "s"}, 0),
    "HEARTBEAT": ({}, 0),
    "BYE": ({}, 0),
    "ERROR": ({"code": "busy", "message": "later", "retryable": True, "supported": [1]}, 0),
}


def mutations(msg_type: str, req: int):
    """(what, frames): ``msg_type``'s example, each spoilt in one way with ``req`` still readable (§7.1)."""
    fields, n_payloads = EXAMPLES[msg_type]
    payloads = [b"p"] * n_payloads
    _, required, optional, _ = codec.SCHEMAS[msg_type]
    for name in required:
        yield (
            f"no {name}",
            codec.encode(msg_type, req, payloads, **{k: v for k, v in fields.items() if k != name}),
        )
    for name, kind in {**required, **optional}.items():
        wrong = [1.5] if kind in ("str", "int", "uint") else "x"
        yield f"{name} mistyped", codec.encode(msg_type, req, payloads, **dict(fields, **{name: wrong}))
        if not kind.endswith("?"):
            yield f"{name} nil", codec.encode(msg_type, req, payloads, **dict(fields, **{name: None}))
    yield "one payload too many", codec.encode(msg_type, req, [*payloads, b"x"], **fields)
    header = msgpack.packb({"v": 1, "type": msg_type, "req": req, **fields}, use_bin_type=True)
    yield "version 2", [msgpack.packb({"v": 2, "type": msg_type, "req": req})]
    yield "no v", [msgpack.packb({"type": msg_type, "req": req})]
    yield "type mistyped", [msgpack.packb({"v": 1, "type": 7, "req": req})]
    yield "type in lower case", [msgpack.packb({"v": 1, "type": msg_type.lower(), "req": req})]
    if fields:  # the header cut right after `req`, and one byte later
        envelope = len(msgpack.packb({"v": 1, "type": msg_type, "req": req}))
        yield "cut after req", [header[:envelope]]
        yield "cut inside the fields", [header[: envelope + 1]]
    yield "garbage after the header", [header + b"\xc1"]
    yield "oversized", [msgpack.packb({"v": 1, "type": msg_type, "req": req, "pad": "x" * 70000})]


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
        self.state_dir = state_dir
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


def gated_runner(spec: JobSpec, progress, should_cancel) -> dict:
    """Announce the attempt (file ``started-<pid>-<n>`` in the gate folder), wait for ``open`` at the gate,
    run for real. At the render gate, the file ``rendering-<pid>-<n>`` says a partial result exists."""
    gate = Path(os.environ[GATE_ENV])
    (gate / f"started-{os.getpid()}-{time.monotonic_ns()}").write_text(spec.video.name)
    if os.environ.get(GATE_AT_ENV) == "render":

        def gated(stage: str, done: int, total: int, message: str = "") -> None:
            progress(stage, done, total, message)
            if stage == "render" and done > 0:
                # the encoder writes on a thread of its own: hold once the partial result file is there
                wait_for(
                    lambda: list(spec.output.parent.glob(f".{spec.output.name}.*.part")),
                    30,
                    "the partial result file",
                )
                _hold(gate, "rendering", lambda: progress(stage, done, total, message), should_cancel)

        return run_redub(spec, gated, should_cancel)
    progress("gate", 0, 1, "waiting at the test gate")
    _hold(gate, "", lambda: progress("gate", 0, 1, "waiting at the test gate"), should_cancel)
    return run_redub(spec, progress, should_cancel)


def _hold(gate: Path, marker: str, alive, should_cancel) -> None:
    """Wait for ``gate/open``, reporting progress all along: a worker whose server is gone finds out here."""
    if marker and not (gate / "open").exists():
        (gate / f"{marker}-{os.getpid()}-{time.monotonic_ns()}").touch()
    while not (gate / "open").exists():
        if should_cancel():
            raise CancelledError("cancelled at the gate")
        alive()
        time.sleep(0.05)


def started_markers(gate: Path, kind: str = "started") -> list[Path]:
    return sorted(gate.glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime_ns)


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

    def submit(self, job_id: str, spec: JobSpec) -> None:
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

    def submit(self, job_id: str, spec: JobSpec) -> None:
        output = spec.output
        shutil.copy(spec.video, output)
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

"""Worker pools run jobs behind one small interface (``WorkerPool``); ``ProcessWorkerPool`` is the local one.

A local worker is a spawned process that imports its runner once (models stay loaded on its device) and then
runs one job at a time, reporting progress over a pipe. The pool notices a worker that dies (its pipe closes),
reports the job it was running and starts a fresh worker in its place. A worker whose server is gone exits
at once and quietly (PROTOCOL.md §8.1: the restarted server runs the job again).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from retalk_server.errors import error_code
from retalk_server.spec import JobSpec

from retalk.device import resolve_device
from retalk.errors import CancelledError

# progress(stage, done, total, message) as a runner reports it
Progress = Callable[[str, int, int, str], None]
# runner(spec, progress, should_cancel) -> the result map (PROGRESS.result, §4.4); raises to fail the job
Runner = Callable[[JobSpec, Progress, Callable[[], bool]], dict]


@dataclass
class WorkerEvent:
    """What a pool reports of a job. ``data`` by ``kind``: progress {stage, done, total, message}; done: the
    result map; failed {code (§7, from errors.error_code), message, traceback}; cancelled {}; died {message}
    (the worker was lost: the job is run again, up to the attempt limit)."""

    kind: str  # progress | done | failed | cancelled | died
    job: str
    data: dict = field(default_factory=dict)


class WorkerPool(Protocol):
    """Where jobs run. The server's loop is its only caller; no method may block."""

    def capacity(self) -> int:
        """How many more jobs the pool can take now."""

    def submit(self, job_id: str, spec: JobSpec) -> None:
        """Run ``spec`` (placed with ``spec.on(device, precision)`` where it lands); only when capacity() > 0."""

    def cancel(self, job_id: str) -> None:
        """Ask the job's runner to stop at its next check; its end is reported by poll() (cancelled)."""

    def poll(self) -> list[WorkerEvent]:
        """The events since the last call, in order."""

    def describe(self) -> list[dict]:
        """One map per worker for STATUS (§4.5): id, pid, device, job, alive, ready."""

    def wakeups(self) -> list:
        """Objects with fileno() (or zmq sockets) that become readable when poll() has something."""

    def close(self) -> None:
        """Stop every worker (a running job is cut short: the journal runs it again at the next start)."""


def load_runner(path: str) -> Runner:
    """``module:function`` → the function."""
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def failure(err: Exception) -> dict:
    """A failed event's data for ``err``, raised by a runner (call it in the ``except`` block: an internal
    fault carries its traceback)."""
    code = error_code(err)
    text = f"{type(err).__name__}: {err}" if code == "internal" else str(err)
    detail = traceback.format_exc() if code == "internal" else ""
    return {"code": code, "message": text, "traceback": detail}


def _watch_parent(parent_pid: int) -> None:
    # A worker must not outlive its server (a SIGKILLed server cannot stop it): it would finish a job the
    # restarted server runs again.
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(1)


class _ServerGone(BaseException):
    """The pipe to the server broke: unwinds the job (so the pipeline removes its partial output) and ends
    the worker quietly. A BaseException, so a runner's ``except Exception`` does not take it for a fault."""


def _worker_main(conn, cancel_token, runner_path: str, device: str, precision: str, parent_pid: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    def send(message: tuple) -> None:
        try:
            conn.send(message)
        except (OSError, EOFError):
            raise _ServerGone from None

    try:
        device = str(resolve_device(device))
        runner = load_runner(runner_path)
        send(("ready", {"pid": os.getpid(), "device": device}))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "stop":
                return
            _, token, spec = message
            send(_run_one(runner, spec.on(device, precision), token, cancel_token, send))
    except _ServerGone:
        return


def _run_one(runner: Runner, spec: JobSpec, token: int, cancel_token, send) -> tuple:
    """Run one job; the final message for the server."""

    def progress(stage: str, done: int, total: int, text: str = "") -> None:
        send(("progress", token, {"stage": stage, "done": done, "total": total, "message": text}))

    try:
        return ("done", token, runner(spec, progress, lambda: cancel_token.value == token))
    except CancelledError:
        return ("cancelled", token, {})
    except Exception as err:
        return ("failed", token, failure(err))


@dataclass
class _Worker:
    id: int
    process: multiprocessing.process.BaseProcess
    conn: object
    cancel_token: object
    device: str = ""
    job: str | None = None
    token: int = 0
    ready: bool = False


class ProcessWorkerPool:
    """``size`` local worker processes (spawned: no forked threads, no forked CUDA state)."""

    def __init__(self, size: int, *, runner: str, device: str = "auto", precision: str = "fp32"):
        self._context = multiprocessing.get_context("spawn")
        self._runner = runner
        self._device, self._precision = device, precision
        self._tokens = 0
        self._workers = [self._start(i) for i in range(size)]

    def _start(self, worker_id: int) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        cancel_token = self._context.Value("q", 0, lock=False)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, cancel_token, self._runner, self._device, self._precision, os.getpid()),
            name=f"retalk-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(worker_id, process, parent_conn, cancel_token)

    def capacity(self) -> int:
        return sum(1 for w in self._workers if w.ready and w.job is None)

    def submit(self, job_id: str, spec: JobSpec) -> None:
        worker = next(w for w in self._workers if w.ready and w.job is None)
        self._tokens += 1
        worker.job, worker.token = job_id, self._tokens
        try:
            worker.conn.send(("run", worker.token, spec))
        except OSError:
            pass  # the worker just died: poll() reports the job as "died" and it is retried

    def cancel(self, job_id: str) -> None:
        for worker in self._workers:
            if worker.job == job_id:
                worker.cancel_token.value = worker.token

    def poll(self) -> list[WorkerEvent]:
        events: list[WorkerEvent] = []
        for index, worker in enumerate(self._workers):
            try:
                while worker.conn.poll():
                    kind, *rest = worker.conn.recv()
                    if kind == "ready":
                        worker.ready, worker.device = True, rest[0]["device"]
                        continue
                    token, data = rest
                    if token != worker.token or worker.job is None:
                        continue
                    events.append(WorkerEvent(kind, worker.job, data))
                    if kind != "progress":
                        worker.job = None
            except (EOFError, OSError):
                pass
            if not worker.process.is_alive():
                worker.process.join(timeout=1)
                if worker.job is not None:
                    reason = f"worker {worker.process.pid} died (exit code {worker.process.exitcode})"
                    events.append(WorkerEvent("died", worker.job, {"message": reason}))
                worker.conn.close()
                self._workers[index] = self._start(worker.id)
        return events

    def describe(self) -> list[dict]:
        return [
            {
                "id": w.id,
                "pid": w.process.pid,
                "device": w.device,
                "job": w.job,
                "alive": w.process.is_alive(),
                "ready": w.ready,
            }
            for w in self._workers
        ]

    def wakeups(self) -> list:
        return [w.conn for w in self._workers]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(("stop",))
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

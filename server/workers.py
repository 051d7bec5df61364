"""Worker processes that run jobs, behind one small interface (a later issue swaps in a Ray cluster).

A worker is a spawned process that imports its runner once (models stay loaded on its device) and then runs
one job at a time, reporting progress over a pipe. The pool notices a worker that dies (its pipe closes),
reports the job it was running and starts a fresh worker in its place.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from retalk.device import resolve_device
from retalk.errors import CancelledError, CheckpointError, InputError, MediaError

# A runner: runner(spec, progress(stage, done, total, message), should_cancel) -> result dict.
Runner = Callable[[dict, Callable[[str, int, int, str], None], Callable[[], bool]], dict]
DEFAULT_RUNNER = "retalk_server.runner:run_redub"

# Pipeline errors that are the input's fault: retrying cannot help (PROTOCOL.md §8.2).
ERROR_CODES = ((InputError, "invalid"), (MediaError, "media"), (CheckpointError, "checkpoint"))


@dataclass
class WorkerEvent:
    kind: str  # progress | done | failed | cancelled | died
    job: str
    data: dict = field(default_factory=dict)


class WorkerPool(Protocol):
    def capacity(self) -> int:
        """How many more jobs the pool can take now."""

    def submit(self, job_id: str, spec: dict) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def poll(self) -> list[WorkerEvent]: ...

    def describe(self) -> list[dict]:
        """One map per worker for STATUS (§4.5): id, pid, device, job, alive."""

    def wakeups(self) -> list:
        """Objects with fileno() that become readable when poll() has something."""

    def close(self) -> None: ...


def load_runner(path: str) -> Runner:
    """``module:function`` → the function."""
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def failure(err: Exception) -> dict:
    """A failed event's data for ``err``, raised by a runner (call it in the ``except`` block)."""
    code = next((code for cls, code in ERROR_CODES if isinstance(err, cls)), "internal")
    text = str(err) if code != "internal" else f"{type(err).__name__}: {err}"
    detail = traceback.format_exc() if code == "internal" else ""
    return {"code": code, "message": text, "traceback": detail}


def _watch_parent(parent_pid: int) -> None:
    # A worker must not outlive its server (a SIGKILLed server cannot stop it): it would finish a job the
    # restarted server runs again.
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(1)


def _worker_main(conn, cancel_token, runner_path: str, device: str, precision: str, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    device = str(resolve_device(device))
    runner = load_runner(runner_path)
    conn.send(("ready", {"pid": os.getpid(), "device": device}))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, token, spec = message
        spec = dict(spec, device=device, precision=precision)

        def progress(stage: str, done: int, total: int, text: str = "", token=token) -> None:
            conn.send(("progress", token, {"stage": stage, "done": done, "total": total, "message": text}))

        def should_cancel(token=token) -> bool:
            return cancel_token.value == token

        try:
            result = runner(spec, progress, should_cancel)
        except CancelledError:
            conn.send(("cancelled", token, {}))
            continue
        except Exception as err:
            conn.send(("failed", token, failure(err)))
            continue
        conn.send(("done", token, result))


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

    def __init__(
        self, size: int, *, runner: str = DEFAULT_RUNNER, device: str = "auto", precision: str = "fp32"
    ):
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

    def submit(self, job_id: str, spec: dict) -> None:
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

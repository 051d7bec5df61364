"""The render farm: the server's WorkerPool on a Ray cluster (``retalk serve --ray``), long jobs split in segments.

Ray starts, places and watches the workers; this module only decides what a task is. One long-lived actor per
GPU (``num_gpus=1``), or per ``cpus_per_worker`` CPUs on a cluster without GPUs, pinned to its node: it imports
the pipeline once and keeps its networks loaded. A job runs as steps on those actors
(``retalk.pipeline.segments``):
  1. check: an actor on every node reads the job's media and finds its folders (shared storage);
  2. prepare: the video-only work over the whole range; a job of at most ``segment_frames`` output frames is
     rendered and encoded in the same step, as on one machine;
  3. render: every segment on whichever actor is free, in parallel, into the job's folder;
  4. assemble: one encode and mux, or intra-only segments joined as they are.
A step whose actor dies (its node lost) or that hits an internal fault runs again elsewhere; after
``max_attempts`` runs (the server's --attempts) the job fails with the reason. A failure retrying cannot fix
(``retalk_server.errors.retried``) fails the job at once. Progress (summed over the segments), cancel, results
and failures reach the server as the same WorkerEvents as from local workers.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from retalk_server.errors import retried
from retalk_server.runner import result_map
from retalk_server.spec import JobSpec
from retalk_server.workers import WorkerEvent, failure

from retalk.errors import CancelledError, InputError, MediaError
from retalk.pipeline.redub import PreparedRedub, prepare, render_and_encode
from retalk.pipeline.request import RedubRequest
from retalk.pipeline.segments import (
    DEFAULT_SEGMENT_FRAMES,
    assemble,
    plan_segments,
    render_segment,
    segment_path,
)

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:
    raise InputError("--ray needs Ray, an optional part of retalk: pip install 'retalk[ray]'") from None

log = logging.getLogger("retalk.server.farm")

RECONCILE_SECONDS = 2.0  # how often the pool looks for nodes that joined or left
CHECK_SECONDS = 30.0  # a node silent this long on the storage check has a hung mount
SHARED_STORAGE = (
    "media roots, job folders and the stage cache must be on storage every node mounts at the same path "
    "(README: Render farm)"
)


def segments_root(output: Path) -> Path:
    """The folder beside a job's output that holds its segments (and its private cache with use_cache off).
    It is in the job's folder, so the server clears it before the job runs again (PROTOCOL.md §8.3)."""
    return output.with_name(output.name + ".segments")


def check_storage(spec: JobSpec, cache_dir: Path, where: str) -> None:
    """MediaError naming the first of the job's files this machine cannot read, or of its folders it cannot
    write into. Folders are never created here: a missing mount would otherwise become a local folder."""
    for name, path in (("video", spec.video), ("audio", spec.audio)):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise MediaError(
                f"{where} cannot read the job's {name} {path} ({err.strerror}): {SHARED_STORAGE}"
            ) from None
    for name, folder in (("job folder", spec.folder), ("stage cache", cache_dir)):
        probe = folder / f".retalk-probe-{uuid.uuid4().hex[:12]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise MediaError(
                f"{where} cannot write into the {name} {folder} ({err.strerror}): {SHARED_STORAGE}"
            ) from None


class FarmWorker:
    """A Ray actor: one step of a job at a time, in a thread, reported through a generator of
    ``(kind, data)``: ``started``, ``progress``..., then ``done``, ``failed`` or ``cancelled``. The last job it
    prepared stays in memory for its next step (the networks stay loaded for every job)."""

    def __init__(self, device: str, precision: str, cache_dir: str) -> None:
        from retalk.device import resolve_device

        self.device = str(resolve_device(device))
        self.precision = precision
        self.cache_dir = Path(cache_dir)
        node = ray.get_runtime_context().get_node_id()
        self.where = f"node {socket.gethostname()} ({ray.util.get_node_ip_address()}, {node[:8]})"
        self._token = self._cancel_token = 0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._warm: tuple[tuple, PreparedRedub] | None = None

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": self.device,
            "where": self.where,
        }

    def check(self, spec: JobSpec) -> str | None:
        """The storage check (step 1): None, or why this node cannot run the job."""
        try:
            check_storage(spec, self.cache_dir, self.where)
        except MediaError as err:
            return str(err)
        return None

    def cancel(self, token: int) -> None:
        self._cancel_token = token

    def run(self, token: int, step: dict):
        self._token, self._events = token, queue.SimpleQueue()
        yield "started", {}
        threading.Thread(target=self._run_step, args=(step, self._events), daemon=True).start()
        while True:
            kind, data = self._events.get()
            yield kind, data
            if kind != "progress":
                return

    # --- inside the step's thread ------------------------------------------------------------------------------

    def _run_step(self, step: dict, events: queue.SimpleQueue) -> None:
        try:
            check_storage(step["spec"], self.cache_dir, self.where)
            result = getattr(self, f"_{step['kind']}")(step)
        except CancelledError:
            events.put(("cancelled", {}))
        except Exception as err:
            events.put(("failed", failure(err)))
        else:
            events.put(("done", result))

    def _report(self, event) -> None:
        data = {"stage": event.stage, "done": event.done, "total": event.total, "message": event.message}
        self._events.put(("progress", data))

    def _should_stop(self) -> bool:
        return self._cancel_token == self._token

    def _request(self, spec: JobSpec) -> RedubRequest:
        request = spec.on(self.device, self.precision).request()
        if request.use_cache:
            request.cache_dir = self.cache_dir
        else:  # the job's own cache, on shared storage, removed with its segments
            request.cache_dir, request.use_cache = segments_root(request.output) / "cache", True
        return request

    def _prepared(self, step: dict) -> PreparedRedub:
        """The job of ``step``, prepared on this machine (from the cache) unless it still is from before."""
        key = (step["job"], step["plan"]["content_key"])
        if self._warm is None or self._warm[0] != key:
            self._warm = None  # release the previous job before preparing this one
            request = self._request(step["spec"])
            job = prepare(request, self._report, self._should_stop, content_key=key[1])
            self._warm = key, job
        return self._warm[1]

    def _prepare(self, step: dict) -> dict:
        request = self._request(step["spec"])
        self._warm = None
        job = prepare(request, self._report, self._should_stop)
        if job.frames <= step["segment_frames"]:
            return {"result": result_map(request, render_and_encode(job))}
        self._warm = (step["job"], job.clip.content_key), job
        folder = segments_root(request.output)
        folder.mkdir(parents=True, exist_ok=True)
        spans = plan_segments(job.frames, step["segment_frames"])
        return {
            "plan": {
                "content_key": job.clip.content_key,
                "frames": job.frames,
                "segments": [(a, b, str(segment_path(folder, request.codec, a, b))) for a, b in spans],
            }
        }

    def _render(self, step: dict) -> dict:
        a, b, path = step["segment"]
        render_segment(self._prepared(step), a, b, Path(path))
        return {}

    def _assemble(self, step: dict) -> dict:
        job = self._prepared(step)
        result = assemble(job, [Path(path) for _, _, path in step["plan"]["segments"]])
        self._warm = None
        return result_map(job.request, result)


@dataclass
class _Actor:
    id: int
    node_id: str
    handle: object
    starting: object  # the ObjectRef of its first info() call, None once ready
    pid: int | None = None
    device: str = ""
    where: str = ""
    step: _Step | None = None
    warm: str | None = None  # the job it prepared last


@dataclass
class _Step:
    job: _Job
    kind: str  # prepare | render | assemble
    segment: tuple | None = None  # (a, b, path) of a render step
    runs: int = 0  # runs that started (a step lost on its way to a dead actor does not count)
    token: int = 0
    actor: _Actor | None = None
    stream: object = None  # the ObjectRefGenerator of the running call
    stage: str = ""
    done: int = 0
    total: int = 0

    def describe(self) -> str:
        return f"segment [{self.segment[0]}, {self.segment[1]})" if self.segment else f"the {self.kind} step"


@dataclass
class _Job:
    id: str
    spec: JobSpec
    checks: dict = field(default_factory=dict)  # ObjectRef of a node's storage check (step 1) -> the node
    check_deadline: float = 0.0
    plan: dict | None = None
    rendered: int = 0  # frames of finished segments
    segments_left: int = 0
    steps: list[_Step] = field(default_factory=list)  # running ones
    cancelled: bool = False
    over: bool = False  # its final event went out
    reported: tuple = ()


class RayPool:
    """The WorkerPool of ``retalk serve --ray``. ``address``: a cluster's address, ``""`` for ``$RAY_ADDRESS``
    or the cluster ``ray start --head`` made on this machine, ``"local"`` to start a one-machine cluster.
    ``segment_frames``: None for ``DEFAULT_SEGMENT_FRAMES``. ``max_attempts``: runs of one step, the first
    included (the server's --attempts, PROTOCOL.md §8.2)."""

    def __init__(
        self,
        address: str,
        *,
        state_dir: Path,
        device: str = "auto",
        precision: str = "fp32",
        segment_frames: int | None = None,
        cpus_per_worker: int = 4,
        max_attempts: int = 3,
    ) -> None:
        segment_frames = DEFAULT_SEGMENT_FRAMES if segment_frames is None else segment_frames
        if segment_frames < 1 or cpus_per_worker < 1:
            raise InputError(
                f"--segment-frames {segment_frames}, --cpus-per-worker {cpus_per_worker}: each must be at least 1"
            )
        self.cache_dir = Path(state_dir).resolve() / "cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.segment_frames, self.cpus_per_worker, self.max_attempts = (
            segment_frames,
            cpus_per_worker,
            max_attempts,
        )
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        local = {"include_dashboard": False} if address == "local" else {}
        try:
            ray.init(address=address, namespace="retalk", logging_level=logging.WARNING, **local)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError(
                f"--ray {address}: no Ray cluster there ({err}); start one with `ray start --head`, "
                "or use --ray local"
            ) from None
        self._worker_class = ray.remote(FarmWorker)
        self._actor_args = (device, precision, str(self.cache_dir))
        self._actors: list[_Actor] = []
        self._next_id = self._tokens = 0
        self._jobs: dict[str, _Job] = {}
        self._pending: list[_Step] = []
        self._next_reconcile = 0.0
        self._reconcile()

    # --- WorkerPool ------------------------------------------------------------------------------------------

    def capacity(self) -> int:
        idle = sum(1 for a in self._actors if a.starting is None and a.step is None)
        checking = sum(1 for job in self._jobs.values() if job.checks)
        return max(0, idle - len(self._pending) - checking)

    def submit(self, job_id: str, spec: JobSpec) -> None:
        job = self._jobs[job_id] = _Job(job_id, spec)
        nodes = {a.node_id: a for a in self._actors if a.starting is None}  # one actor a node
        job.checks = {actor.handle.check.remote(spec): actor.where for actor in nodes.values()}
        job.check_deadline = time.monotonic() + CHECK_SECONDS
        if not job.checks:  # no worker is ready yet: each step checks its own node's storage too
            self._pending.append(_Step(job, "prepare"))

    def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.over:
            return
        job.cancelled = True
        self._pending = [step for step in self._pending if step.job is not job]
        job.checks.clear()
        for step in job.steps:
            step.actor.handle.cancel.remote(step.token)

    def poll(self) -> list[WorkerEvent]:
        events: list[WorkerEvent] = []
        if time.monotonic() >= self._next_reconcile:
            self._reconcile()
        self._collect_started_actors()
        for job in list(self._jobs.values()):
            if job.checks:
                self._collect_checks(job, events)
        self._collect_steps(events)
        for job in list(self._jobs.values()):
            if job.cancelled and not job.steps and not job.over:
                self._end(job, events, "cancelled", {})
            if job.over and not job.steps:  # every step stopped: nothing writes into its segments any more
                shutil.rmtree(segments_root(job.spec.output), ignore_errors=True)
                del self._jobs[job.id]
        self._dispatch()
        events += self._progress()
        return events

    def describe(self) -> list[dict]:
        """STATUS's workers (§4.5), each with its node and, while busy, its segment and progress."""
        workers = []
        for a in self._actors:
            step = a.step
            workers.append(
                {
                    "id": a.id,
                    "pid": a.pid,
                    "device": a.device,
                    "node": a.where.removeprefix("node ") or a.node_id[:8],
                    "job": step.job.id if step else None,
                    "segment": list(step.segment[:2]) if step and step.segment else None,
                    "progress": [step.stage, step.done, step.total] if step and step.stage else None,
                    "alive": True,
                    "ready": a.starting is None,
                }
            )
        return workers

    def wakeups(self) -> list:
        return []  # Ray has no file descriptor to wait on: the server's loop polls several times a second

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor.handle, no_restart=True)
        self._actors.clear()
        ray.shutdown()

    # --- actors ------------------------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """One actor per GPU of every live node (or per ``cpus_per_worker`` CPUs on a cluster without GPUs);
        actors of nodes that left are forgotten (their steps fail and run elsewhere)."""
        self._next_reconcile = time.monotonic() + RECONCILE_SECONDS
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        for actor in [a for a in self._actors if a.node_id not in nodes and a.step is None]:
            self._drop(actor)
        gpus = any(resources.get("GPU", 0) >= 1 for resources in nodes.values())
        for node_id, resources in nodes.items():
            cpus = resources.get("CPU", 0)
            if gpus:
                slots = int(resources.get("GPU", 0))
                options = {"num_gpus": 1, "num_cpus": cpus / max(slots, 1)}
            else:
                slots = max(1, int(cpus // self.cpus_per_worker)) if cpus >= 1 else 0
                options = {"num_cpus": min(self.cpus_per_worker, cpus)}
            for _ in range(slots - sum(1 for a in self._actors if a.node_id == node_id)):
                handle = self._worker_class.options(
                    **options,
                    max_concurrency=2,  # a step, and check/cancel/info beside it
                    max_restarts=0,  # a lost actor is replaced here, its step run again elsewhere
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(*self._actor_args)
                self._next_id += 1
                self._actors.append(_Actor(self._next_id, node_id, handle, handle.info.remote()))

    def _collect_started_actors(self) -> None:
        starting = [a.starting for a in self._actors if a.starting is not None]
        if not starting:
            return
        ready, _ = ray.wait(starting, num_returns=len(starting), timeout=0)
        for actor in [a for a in self._actors if a.starting in ready]:
            try:
                info = ray.get(actor.starting)
            except ray.exceptions.RayError as err:
                log.error("farm worker %d on node %s did not start: %s", actor.id, actor.node_id[:12], err)
                self._drop(actor)
                continue
            actor.starting, actor.pid, actor.device, actor.where = (
                None,
                info["pid"],
                info["device"],
                info["where"],
            )
            log.info(
                "farm worker %d ready on %s (%s, pid %d)", actor.id, actor.where, actor.device, actor.pid
            )

    def _drop(self, actor: _Actor) -> None:
        if actor in self._actors:
            self._actors.remove(actor)
        ray.kill(actor.handle, no_restart=True)

    # --- steps -------------------------------------------------------------------------------------------------

    def _collect_checks(self, job: _Job, events: list[WorkerEvent]) -> None:
        ready, _ = ray.wait(list(job.checks), num_returns=len(job.checks), timeout=0)
        for ref in ready:
            del job.checks[ref]
            try:
                problem = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # its actor is gone: the node no longer takes part
            if problem is not None:
                job.checks.clear()
                self._end(job, events, "failed", {"code": "media", "message": problem})
                return
        if job.checks and time.monotonic() > job.check_deadline:
            where = ", ".join(sorted(set(job.checks.values())))
            job.checks.clear()
            message = (
                f"{where} did not answer the storage check in {CHECK_SECONDS:.0f} s (a hung network mount?)"
            )
            self._end(job, events, "failed", {"code": "media", "message": message})
        elif not job.checks:
            self._pending.append(_Step(job, "prepare"))

    def _dispatch(self) -> None:
        for step in list(self._pending):
            idle = [a for a in self._actors if a.starting is None and a.step is None]
            if not idle:
                return
            actor = next((a for a in idle if a.warm == step.job.id), idle[0])
            self._pending.remove(step)
            self._tokens += 1
            step.token, step.actor, step.stage, step.done, step.total = self._tokens, actor, "", 0, 0
            actor.step = step
            step.job.steps.append(step)
            payload = {"kind": step.kind, "job": step.job.id, "spec": step.job.spec}
            if step.kind == "prepare":
                payload["segment_frames"] = self.segment_frames
            else:
                payload["plan"] = step.job.plan
                payload["segment"] = step.segment
            step.stream = actor.handle.run.remote(step.token, payload)

    def _collect_steps(self, events: list[WorkerEvent]) -> None:
        for actor in [a for a in self._actors if a.step is not None]:
            step = actor.step
            try:
                for _ in range(256):  # what is there now, bounded: other steps get their turn
                    if not step.stream.next_ready():
                        break
                    kind, data = ray.get(next(step.stream))
                    if self._on_step(step, kind, data, events):
                        break
            except ray.exceptions.RayTaskError as err:  # the step raised outside the pipeline's own handling
                self._step_ended(step)
                self._retry(step, events, f"{type(err.cause).__name__}: {err.cause}", str(err))
            except ray.exceptions.RayError as err:  # the actor or its node is gone
                self._step_ended(step)
                self._drop(actor)
                reason = f"the worker on {actor.where} was lost ({type(err).__name__})"
                log.warning("job %s: %s during %s", step.job.id, reason, step.describe())
                self._retry(step, events, reason, "")

    def _step_ended(self, step: _Step) -> None:
        step.job.steps.remove(step)
        step.actor.step, step.stream = None, None

    def _on_step(self, step: _Step, kind: str, data: dict, events: list[WorkerEvent]) -> bool:
        """One event of a running step; True when it was the step's last."""
        job = step.job
        if kind == "started":
            step.runs += 1
            return False
        if kind == "progress":
            step.stage, step.done, step.total = data["stage"], data["done"], data["total"]
            return False
        self._step_ended(step)
        if kind == "done":
            step.actor.warm = job.id  # the actor keeps the job prepared: its next step of the job goes there
        if job.over or job.cancelled:  # its job already ended, or is ending once every step has stopped
            log.info(
                "job %s: %s stopped (%s) after the job %s",
                job.id,
                step.describe(),
                kind,
                "was cancelled" if job.cancelled else "ended",
            )
            return True
        if kind == "failed":
            if not retried(data["code"]):  # the input's fault: no other machine would do better
                self._end(job, events, "failed", data)
            else:
                self._retry(step, events, data["message"], data.get("traceback", ""))
        elif kind == "cancelled":  # a cancel meant for an earlier token: run it again
            self._retry(step, events, "the step stopped unasked", "")
        elif step.kind == "prepare":
            if "result" in data:
                self._end(job, events, "done", data["result"])
            else:
                job.plan, job.segments_left = data["plan"], len(data["plan"]["segments"])
                self._pending += [_Step(job, "render", segment=tuple(s)) for s in job.plan["segments"]]
                log.info("job %s: %d frames in %d segments", job.id, job.plan["frames"], job.segments_left)
        elif step.kind == "render":
            job.rendered += step.segment[1] - step.segment[0]
            job.segments_left -= 1
            if job.segments_left == 0:
                self._pending.insert(0, _Step(job, "assemble"))  # the job's last step goes first
        else:
            self._end(job, events, "done", data)
        return True

    def _retry(self, step: _Step, events: list[WorkerEvent], reason: str, detail: str) -> None:
        job = step.job
        if job.over or job.cancelled:
            return
        if step.runs < self.max_attempts:
            log.warning("job %s: %s failed (%s); running it again", job.id, step.describe(), reason)
            self._pending.insert(0, step)
            return
        message = f"{step.describe()}: {reason}; gave up after {step.runs} attempts"
        self._end(job, events, "failed", {"code": "failed", "message": message, "traceback": detail})

    def _end(self, job: _Job, events: list[WorkerEvent], kind: str, data: dict) -> None:
        """The job's final event; steps still running are asked to stop (their events are ignored)."""
        job.over = True
        self._pending = [step for step in self._pending if step.job is not job]
        for step in job.steps:
            step.actor.handle.cancel.remote(step.token)
        events.append(WorkerEvent(kind, job.id, data))

    def _progress(self) -> list[WorkerEvent]:
        """One progress event per job whose progress changed: a render is summed over the segments."""
        events = []
        for job in self._jobs.values():
            if job.over or job.cancelled:
                continue
            if job.checks:
                state = ("check", 0, 1)
            elif job.plan is not None and job.segments_left:
                running = sum(
                    step.done for step in job.steps if step.kind == "render" and step.stage == "render"
                )
                state = ("render", job.rendered + running, job.plan["frames"])
            elif job.steps and job.steps[0].stage:
                state = (job.steps[0].stage, job.steps[0].done, job.steps[0].total)
            else:
                continue
            if state != job.reported:
                job.reported = state
                data = {"stage": state[0], "done": state[1], "total": state[2], "message": ""}
                events.append(WorkerEvent("progress", job.id, data))
        return events

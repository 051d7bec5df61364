"""Jobs (PROTOCOL.md §4.3-§4.5, §8): a SUBMIT checked once and journaled, the priority queue, the worker pool's
events, and the sessions that follow each job.
"""

from __future__ import annotations

import heapq
import secrets
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from retalk_protocol import codec
from retalk_protocol import options as job_options
from retalk_protocol.codec import Message, ProtocolError
from retalk_server.config import ServerConfig
from retalk_server.errors import retried
from retalk_server.journal import JobRecord, Journal
from retalk_server.logs import guard
from retalk_server.paths import confine
from retalk_server.sessions import Outbox, Session, Uploads
from retalk_server.spec import JobSpec
from retalk_server.workers import WorkerEvent, WorkerPool

from retalk import media

log = guard()

LIST_LIMIT = 1000  # most jobs one LIST asks for
LIST_BYTES = codec.MAX_HEADER_BYTES // 2  # a JOBS reply stays well inside one header (§4.5, §6.1)


@dataclass
class Running:
    attempt: int
    stage: str = ""
    done: int = 0
    total: int = 0
    stage_started: float = field(default_factory=time.monotonic)

    def eta(self) -> float | None:
        if self.done <= 0 or self.total <= self.done:
            return None
        elapsed = time.monotonic() - self.stage_started
        return elapsed / self.done * (self.total - self.done)


@dataclass
class PendingSubmit:
    """A SUBMIT whose clip is being probed off the loop; ACCEPTED (or ERROR) goes out when the probe ends."""

    identity: bytes
    message: Message
    job_id: str
    spec: JobSpec
    probe: Future


def clear_outputs(spec: JobSpec) -> None:
    """Everything in the job's folder but its inputs, removed: the result or the partial files of a run that
    was cut short (§8.3), before the job runs again or after it was cancelled."""
    inputs = spec.inputs()
    for path in spec.folder.iterdir() if spec.folder.is_dir() else ():
        if path in inputs:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class Jobs:
    def __init__(
        self,
        config: ServerConfig,
        journal: Journal,
        pool: WorkerPool,
        uploads: Uploads,
        outbox: Outbox,
        sessions: dict[bytes, Session],
        roots: list[Path],
        folder: Path,
    ):
        self.config, self.journal, self.pool = config, journal, pool
        self.uploads, self.outbox, self.sessions, self.roots = uploads, outbox, sessions, roots
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.queue: list[tuple[int, int, str]] = []  # (-priority, seq, job): run order
        self.running: dict[str, Running] = {}
        self.subscribers: dict[str, set[bytes]] = {}
        # probing a clip reads its whole packet index (seconds for a feature-length file): never on the loop
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retalk-probe")
        self.pending: list[PendingSubmit] = []
        for record in journal.recover():
            self._enqueue(record)
            log.info("job %s resumed after restart (attempts so far: %d)", record.id, record.attempts)

    def close(self) -> None:
        self._probes.shutdown(wait=True, cancel_futures=True)
        for pending in self.pending:  # never journaled: nothing refers to these folders
            shutil.rmtree(pending.spec.folder, ignore_errors=True)

    def _enqueue(self, record: JobRecord) -> None:
        heapq.heappush(self.queue, (-record.priority, record.seq, record.id))

    def _job(self, job_id: str) -> JobRecord:
        record = self.journal.get(job_id)
        if record is None:
            raise ProtocolError("not-found", f"no job {job_id[:32]!r} on this server")
        return record

    def queued(self) -> list[str]:
        """Queued jobs in run order (STATUS, §4.5)."""
        return [job for _, _, job in sorted(self.queue) if self.journal.state(job) == "queued"]

    # -- SUBMIT (§4.3) -------------------------------------------------------------------------------------
    def on_submit(self, session: Session, message: Message) -> None:
        waiting = sum(1 for _, _, job in self.queue if job not in self.running) + len(self.pending)
        if waiting >= self.config.max_queue:
            raise ProtocolError("busy", "the job queue is full; try again later")
        job_id = secrets.token_hex(8)
        job_dir = self.folder / job_id
        job_dir.mkdir()
        try:
            spec = self._spec(session, message, job_dir)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        probe = self._probes.submit(media.probe, spec.video)
        self.pending.append(PendingSubmit(session.identity, message, job_id, spec, probe))

    def _spec(self, session: Session, message: Message, job_dir: Path) -> JobSpec:
        """The job a SUBMIT asks for, checked once — by the checks `retalk redub` makes — as far as that goes
        without reading the clip."""
        try:
            values = job_options.complete(message.get("options", {}))
        except ValueError as err:
            raise ProtocolError("invalid", str(err)) from None
        for option in job_options.JOB_OPTIONS.values():  # a file an option names is confined too (§6.2)
            value = values[option.name]
            if option.path and isinstance(value, str) and value not in option.choices:
                values[option.name] = str(confine(value, self.roots))
        codec_name = values["codec"]
        suffix = media.default_extension(codec_name) if codec_name in media.CODECS else ""
        spec = JobSpec(
            video=self._media(session, message["clip"], job_dir / "clip"),
            audio=self._media(session, message["audio"], job_dir / "audio"),
            output=job_dir / f"result{suffix}",
            start=message.get("start", 0),
            end=message.get("end"),
            audio_offset=codec.from_rational(message.get("audio_offset", [0, 1])),
            engine=message.get("engine", job_options.ENGINE.default),
            options=values,
        )
        spec.request().validate()
        return spec

    def _media(self, session: Session, ref: dict, target: Path) -> Path:
        if "path" in ref:
            return confine(ref["path"], self.roots)
        return self.uploads.take(session, ref["upload"], target)

    def finish_submits(self) -> None:
        """Answer the SUBMITs whose probe has ended: journal the job and reply ACCEPTED, or reply ERROR."""
        done, waiting = [], []
        for pending in self.pending:  # one look at each probe: it may end meanwhile
            (done if pending.probe.done() else waiting).append(pending)
        self.pending = waiting
        for pending in done:
            session = self.sessions.get(pending.identity)
            if session is None:  # the client left before ACCEPTED: no one knows of this job
                shutil.rmtree(pending.spec.folder, ignore_errors=True)
                continue
            with self.outbox.answering(session, pending.message.req):
                try:
                    record = self._admit(session, pending, pending.probe.result())
                except BaseException:
                    shutil.rmtree(pending.spec.folder, ignore_errors=True)
                    raise
                self._enqueue(record)
                self.subscribers.setdefault(record.id, set()).add(session.identity)
                position = sum(1 for job in self.queued() if job != record.id)
                log.info(
                    "%s: SUBMIT accepted as job %s (clip %s)", session.label(), record.id, record.spec.video
                )
                self.outbox.reply(session, pending.message, "ACCEPTED", job=record.id, position=position)

    def _admit(self, session: Session, pending: PendingSubmit, info: media.VideoInfo) -> JobRecord:
        """Check the rate and the range against the probed clip, then journal the job (§8.1: committed
        before ACCEPTED goes out)."""
        message, spec = pending.message, pending.spec
        if message.get("rate") is not None and codec.from_rational(message["rate"]) != info.rate:
            raise ProtocolError(
                "invalid",
                f"the clip's frame rate is {info.rate}, not {codec.from_rational(message['rate'])}: "
                "frame numbers would name other frames (§4.3)",
            )
        spec.request().frame_range(info.frame_count)
        return self.journal.add(
            pending.job_id, spec, priority=message.get("priority", 0), client=session.label()
        )

    # -- WATCH, LIST, CANCEL (§4.4, §4.5) ------------------------------------------------------------------
    def _progress(self, record: JobRecord) -> dict:
        running = self.running.get(record.id)
        return {
            "job": record.id,
            "state": record.state,
            "stage": running.stage if running else "",
            "done": running.done if running else 0,
            "total": running.total if running else 0,
            "eta": running.eta() if running else None,
            "attempt": record.attempts,
            "error": record.error,
            "result": record.result,
        }

    def _broadcast(self, job_id: str) -> None:
        record = self._job(job_id)
        frames = codec.encode("PROGRESS", 0, **self._progress(record))
        for identity in list(self.subscribers.get(record.id, ())):
            if identity in self.sessions:
                self.outbox.send(identity, frames)
        if record.state in codec.FINAL_STATES:
            self.subscribers.pop(record.id, None)

    def forget(self, session: Session) -> None:
        """A session gone: it follows no job any more (its jobs go on)."""
        for subscribers in self.subscribers.values():
            subscribers.discard(session.identity)

    def on_watch(self, session: Session, message: Message) -> None:
        record = self._job(message["job"])
        if record.state not in codec.FINAL_STATES:
            self.subscribers.setdefault(record.id, set()).add(session.identity)
        self.outbox.reply(session, message, "PROGRESS", **self._progress(record))

    def on_list(self, session: Session, message: Message) -> None:
        limit = min(message.get("limit", 100), LIST_LIMIT)
        records = self.journal.list(message.get("states"), limit + 1, job=message.get("job"))
        entries, size = [], 0
        for record in records[:limit]:
            progress = self._progress(record)
            entry = dict(
                record.summary(),
                stage=progress["stage"],
                done=progress["done"],
                total=progress["total"],
                age=max(0.0, time.time() - record.created),
            )
            size += len(msgpack.packb(entry, use_bin_type=True))
            if size > LIST_BYTES:
                break
            entries.append(entry)
        self.outbox.reply(session, message, "JOBS", jobs=entries, more=len(entries) < len(records))

    def on_cancel(self, session: Session, message: Message) -> None:
        record = self._job(message["job"])
        log.info("%s: CANCEL job %s (%s)", session.label(), record.id, record.state)
        if record.state == "queued":
            self.journal.finish(record.id, "cancelled")
            clear_outputs(record.spec)
            self._broadcast(record.id)
        elif record.state == "running":
            self.pool.cancel(record.id)
        else:
            raise ProtocolError("invalid", f"job {record.id} is already {record.state}; nothing to cancel")
        self.outbox.reply(session, message, "CANCELLED", job=record.id, state=self.journal.state(record.id))

    def finished(self, job_id: str) -> JobRecord:
        """A done job, whose result RENDER and FETCH serve (§4.6, §4.7)."""
        record = self._job(job_id)
        if record.state == "expired":
            raise ProtocolError("expired", f"job {record.id}'s result was removed after its retention period")
        if record.state in ("queued", "running"):
            raise ProtocolError("not-ready", f"job {record.id} is {record.state}; ask again when it is done")
        if record.state != "done":
            raise ProtocolError("invalid", f"job {record.id} ended {record.state}: it has no result")
        return record

    # -- the worker pool (§8.2) ----------------------------------------------------------------------------
    def dispatch(self) -> None:
        while self.queue and self.pool.capacity() > 0:
            _, _, job_id = heapq.heappop(self.queue)
            record = self.journal.get(job_id)
            if record is None or record.state != "queued":
                continue  # cancelled while queued
            clear_outputs(record.spec)  # what a run cut short by a crash or a dead worker left (§8.3)
            attempt = self.journal.start(job_id)
            self.running[job_id] = Running(attempt)
            self.pool.submit(job_id, record.spec)
            log.info("job %s started (attempt %d)", job_id, attempt)
            self._broadcast(job_id)

    def poll_workers(self) -> None:
        for event in self.pool.poll():
            self._on_worker(event)

    def _on_worker(self, event: WorkerEvent) -> None:
        job_id = event.job
        running = self.running.get(job_id)
        if running is None:
            return
        if event.kind == "progress":
            if event.data["stage"] != running.stage:
                running.stage, running.stage_started = event.data["stage"], time.monotonic()
            running.done, running.total = event.data["done"], event.data["total"]
            self._broadcast(job_id)
            return
        del self.running[job_id]
        record = self._job(job_id)
        if event.kind == "done":
            self.journal.finish(job_id, "done", result=event.data)
            log.info("job %s done (%d frames)", job_id, event.data.get("frames", 0))
        elif event.kind == "cancelled":
            self.journal.finish(job_id, "cancelled")
            clear_outputs(record.spec)
            log.info("job %s cancelled", job_id)
        elif event.kind == "failed" and not retried(event.data["code"]):
            error = {"code": event.data["code"], "message": event.data["message"], "retryable": False}
            self.journal.finish(job_id, "failed", error=error)
            log.info("job %s failed: %s", job_id, event.data["message"])
        else:  # a worker that died or hit an internal fault: run again, up to the attempt limit (§8.2)
            self._retry(record, event.data)
        self._broadcast(job_id)

    def _retry(self, record: JobRecord, data: dict) -> None:
        for line in data.get("traceback", "").splitlines():
            log.error("job %s: worker fault | %s", record.id, line)
        reason = data["message"]
        if record.attempts < self.config.max_attempts:
            log.warning(
                "job %s: %s; running it again (attempt %d failed)", record.id, reason, record.attempts
            )
            self.journal.requeue(record.id)
            self._enqueue(record)
            return
        message = f"{reason}; gave up after {record.attempts} attempts"
        self.journal.finish(
            record.id, "failed", error={"code": "failed", "message": message, "retryable": False}
        )
        log.error("job %s failed: %s", record.id, message)

    # -- retention (§8.4) ----------------------------------------------------------------------------------
    def expire(self) -> None:
        for record in self.journal.expire(time.time() - self.config.retention):
            shutil.rmtree(record.spec.folder, ignore_errors=True)
            log.info("job %s expired: result removed after the retention period", record.id)

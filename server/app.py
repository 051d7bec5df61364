"""The retalk server: one ROUTER socket, one event loop, a priority queue, a journal and a worker pool.

The loop is the only thread that touches the socket, the journal and the queue; result streams pump from
their own threads (server/streams.py) and workers run in their own processes (server/workers.py). Every
client message is handled inside a guard: whatever a client sends, the answer is at worst an ERROR.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
import zmq
import zmq.auth
from retalk_protocol import codec
from retalk_protocol.codec import Message, ProtocolError
from retalk_server.journal import JobRecord, Journal
from retalk_server.paths import confine
from retalk_server.runner import OPTION_FIELDS, request_from_spec
from retalk_server.streams import Stream, file_messages, render_messages
from retalk_server.workers import DEFAULT_RUNNER, ProcessWorkerPool, WorkerEvent, WorkerPool
from zmq.auth.thread import ThreadAuthenticator

import retalk
from retalk import media
from retalk.device import check_precision, resolve_device
from retalk.errors import InputError, MediaError, RetalkError
from retalk.pipeline.request import CODECS, ENGINES, EXPRESSIONS

log = logging.getLogger("retalk.server")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7878"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Pipeline failures that retrying cannot fix (PROTOCOL.md §8.2); "failed": a pool that retries by itself (the
# Ray farm re-runs a lost segment) gave up.
FINAL_FAILURES = ("invalid", "media", "checkpoint", "failed")
_OPTION_TYPES = {
    "expression": str,
    "upper_face": str,
    "fit": str,
    "extend": str,
    "face": str,
    "codec": str,
    "seed": int,
    "use_cache": bool,
}


@dataclass
class ServerConfig:
    endpoint: str = DEFAULT_ENDPOINT
    media_roots: list[Path] = field(default_factory=list)
    state_dir: Path = field(default_factory=lambda: Path(platformdirs.user_state_dir("retalk")) / "server")
    workers: int = 1
    device: str = "auto"
    precision: str = "fp32"  # the workers' network arithmetic (retalk.device.autocast)
    runner: str = DEFAULT_RUNNER
    max_attempts: int = 3  # runs of one job before a dying worker fails it (§8.2)
    retention: float = 24 * 3600.0  # seconds finished results are kept (§8.4)
    heartbeat: float = 1.0
    timeout: float = 10.0  # a client silent this long is gone (§4.9)
    max_message: int = 64 * 1024 * 1024
    max_upload: int = 4 * 1024 * 1024 * 1024
    chunk: int = 1024 * 1024
    max_credit: int = 16
    max_streams: int = 4  # per session
    max_uploads: int = 4  # unfinished, per session
    max_sessions: int = 1024
    max_queue: int = 10000
    secret_key: Path | None = None  # the server's key_secret file (`retalk keys`): turns CURVE on
    allowed_keys: Path | None = None  # folder of client public .key files admitted by the ZAP handler

    def check(self) -> None:
        """Refuse a configuration that would expose the server unprotected (§2.2) or make no sense."""
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("tcp", "ipc"):
            raise InputError(f"--bind {self.endpoint}: expected tcp://HOST:PORT or ipc://PATH")
        if parts.scheme == "tcp" and parts.hostname not in LOOPBACK_HOSTS and self.secret_key is None:
            raise InputError(
                f"--bind {self.endpoint}: binding beyond 127.0.0.1 requires CURVE; make keys with `retalk keys` "
                "and pass --server-key and --allow"
            )
        if (self.secret_key is None) != (self.allowed_keys is None):
            raise InputError(
                "--server-key and --allow go together: CURVE needs both the key and the allow-list"
            )
        if self.allowed_keys is not None and not Path(self.allowed_keys).is_dir():
            raise InputError(f"--allow {self.allowed_keys}: not a folder of client public keys")
        for root in self.media_roots:
            if not Path(root).is_dir():
                raise InputError(f"--media-root {root}: not a folder")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: at least one worker is needed")
        # refuse --device cuda where there is none, or fp16 on a CPU, before any worker starts
        check_precision(resolve_device(self.device), self.precision)


@dataclass
class Upload:
    id: str
    path: Path
    size: int
    sha256: str
    received: int = 0
    complete: bool = False
    digest: object = field(default_factory=hashlib.sha256)


@dataclass
class Session:
    identity: bytes
    last_seen: float
    name: str = "?"
    user: str = ""  # the CURVE public key the ZAP handler admitted, if any
    hello: bool = False
    streams: set[str] = field(default_factory=set)
    uploads: dict[str, Upload] = field(default_factory=dict)

    def label(self) -> str:
        key = f" key={self.user[:12]}" if self.user else ""
        return f"{self.name}@{self.identity.hex()[:16]}{key}"


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
    job_dir: Path
    spec: dict
    probe: Future


class Server:
    def __init__(self, config: ServerConfig, pool: WorkerPool | None = None):
        config.check()
        self.config = config
        self.roots = [Path(root).resolve() for root in config.media_roots]
        self.state_dir = Path(config.state_dir)
        (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "uploads").mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        self.context = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.router = self._bind()
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._pump_endpoint = f"inproc://retalk-streams-{id(self)}"
        self.pumps = self.context.socket(zmq.PULL)
        self.pumps.bind(self._pump_endpoint)
        self.sessions: dict[bytes, Session] = {}
        self.streams: dict[str, Stream] = {}
        self.subscribers: dict[str, set[bytes]] = {}
        self.queue: list[tuple[int, int, str]] = []
        self.running: dict[str, Running] = {}
        # probing a clip reads its whole packet index (seconds for a feature-length file): never on the loop
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retalk-probe")
        self.pending: list[PendingSubmit] = []
        self.started = time.monotonic()
        self._last_beat = self._last_sweep = 0.0
        for record in self.journal.recover():
            heapq.heappush(self.queue, (-record.priority, record.seq, record.id))
            log.info("job %s resumed after restart (attempts so far: %d)", record.id, record.attempts)
        self.pool = (
            pool
            if pool is not None
            else ProcessWorkerPool(
                config.workers, runner=config.runner, device=config.device, precision=config.precision
            )
        )
        self._handlers = {
            "HELLO": self._on_hello,
            "HEARTBEAT": lambda session, msg: None,
            "BYE": self._on_bye,
            "UPLOAD": self._on_upload,
            "UPLOAD_CHUNK": self._on_upload_chunk,
            "SUBMIT": self._on_submit,
            "WATCH": self._on_watch,
            "STATUS": self._on_status,
            "LIST": self._on_list,
            "CANCEL": self._on_cancel,
            "RENDER": self._on_render,
            "FETCH": self._on_fetch,
            "CREDIT": self._on_credit,
            "ABORT": self._on_abort,
        }

    def _bind(self) -> zmq.Socket:
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message)  # §2.3: refused before allocation
        router.setsockopt(zmq.SNDHWM, 1000)
        router.setsockopt(zmq.RCVHWM, 1000)
        if self.config.secret_key is not None:
            public, secret = zmq.auth.load_certificate(str(self.config.secret_key))
            if secret is None:
                raise InputError(
                    f"--server-key {self.config.secret_key}: not a secret key file (*.key_secret)"
                )
            self.auth = ThreadAuthenticator(self.context, log=logging.getLogger("retalk.server.auth"))
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(self.config.allowed_keys))
            router.curve_server = True
            router.curve_publickey, router.curve_secretkey = public, secret
        try:
            router.bind(self.config.endpoint)
        except zmq.ZMQError as err:
            router.close()
            raise InputError(
                f"--bind {self.config.endpoint}: cannot bind ({err}); is another server there?"
            ) from None
        return router

    # -- the loop ------------------------------------------------------------------------------------------
    def serve(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info(
            "listening on %s (media roots: %s)", self.endpoint, ", ".join(map(str, self.roots)) or "none"
        )
        while not stop.is_set():
            poller = zmq.Poller()
            poller.register(self.router, zmq.POLLIN)
            poller.register(self.pumps, zmq.POLLIN)
            for wakeup in self.pool.wakeups():
                poller.register(wakeup, zmq.POLLIN)
            ready = dict(poller.poll(int(self.config.heartbeat * 250)))
            if self.router in ready:
                for _ in range(256):  # bounded batch: pumps and workers get their turn
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._on_client(frames)
                    except Exception:  # _on_client answers every request itself; this is the last guard
                        log.exception("internal error on a client message")
            phases = (
                self._drain_pumps,
                self._finish_submits,
                self._poll_workers,
                self._dispatch,
                self._housekeeping,
            )
            for phase in phases:
                try:
                    phase()
                except Exception:  # a fault in one turn is logged; the server stays up for the next
                    log.exception("internal error in %s", phase.__name__)

    def _poll_workers(self) -> None:
        for event in self.pool.poll():
            self._on_worker(event)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.stop()
        self._probes.shutdown(wait=True, cancel_futures=True)
        for pending in self.pending:  # never journaled: nothing refers to these folders
            shutil.rmtree(pending.job_dir, ignore_errors=True)
        self.pool.close()
        if self.auth is not None:
            self.auth.stop()
        self.router.close()
        self.pumps.close()
        self.context.term()
        self.journal.close()

    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self.router.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a message to %s: its queue is full", identity.hex()[:8])

    def _error(self, identity: bytes, error: ProtocolError, req: int) -> None:
        self._send(identity, codec.encode_error(error, req))

    # -- client messages -----------------------------------------------------------------------------------
    def _on_client(self, frames: list) -> None:
        identity = frames[0].bytes
        session = self.sessions.get(identity)
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                self._error(identity, ProtocolError("busy", "too many client sessions; try again later"), 0)
                return
            session = self.sessions[identity] = Session(identity, time.monotonic())
            if self.auth is not None:
                try:
                    session.user = frames[-1].get("User-Id") or ""
                except zmq.ZMQError:
                    session.user = ""
        session.last_seen = time.monotonic()
        message = None
        with self._answering(session, 0):
            message = codec.decode(frames[1:])
        if message is None:
            return
        with self._answering(session, message.req):
            handler = self._handlers.get(message.type)
            if handler is None:
                raise ProtocolError("unknown-type", f"{message.type} is sent by servers, not clients (§4)")
            if not session.hello and message.type not in ("HELLO", "HEARTBEAT", "BYE"):
                raise ProtocolError("hello-required", f"send HELLO before {message.type} (§4.1)")
            handler(session, message)

    @contextmanager
    def _answering(self, session: Session, req: int) -> Iterator[None]:
        """Whatever goes wrong while answering request ``req`` becomes its ERROR reply; the server goes on."""
        try:
            yield
        except ProtocolError as err:
            log.info("%s: %s refused: %s", session.label(), err.code, err.message)
            self._error(session.identity, err, req)
        except InputError as err:
            self._error(session.identity, ProtocolError("invalid", str(err)), req)
        except MediaError as err:
            self._error(session.identity, ProtocolError("media", str(err)), req)
        except RetalkError as err:
            self._error(session.identity, ProtocolError("invalid", str(err)), req)
        except Exception:
            log.exception("%s: internal error on a request", session.label())
            error = ProtocolError("internal", "internal server error (logged); try again")
            self._error(session.identity, error, req)

    def _reply(self, session: Session, message: Message, msg_type: str, **fields) -> None:
        self._send(session.identity, codec.encode(msg_type, message.req, **fields))

    def _on_hello(self, session: Session, message: Message) -> None:
        common = set(message["versions"]) & set(codec.SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                "unsupported-version",
                f"no common protocol version: client speaks {message['versions'][:16]}, "
                f"server speaks {list(codec.SUPPORTED_VERSIONS)}",
                supported=list(codec.SUPPORTED_VERSIONS),
            )
        session.hello = True
        session.name = str(message.get("client", "?"))[:64]
        log.info("%s: HELLO", session.label())
        config = self.config
        self._reply(
            session,
            message,
            "WELCOME",
            version=max(common),
            server=f"retalk {retalk.__version__}",
            engines=list(ENGINES),
            formats=list(codec.PIXEL_FORMATS),
            codecs=list(CODECS),
            limits={
                "message": config.max_message,
                "upload": config.max_upload,
                "chunk": config.chunk,
                "credit": config.max_credit,
                "streams": config.max_streams,
            },
            heartbeat=config.heartbeat,
            timeout=config.timeout,
            retention=config.retention,
        )

    def _on_bye(self, session: Session, message: Message) -> None:
        log.info("%s: BYE", session.label())
        self._drop_session(session)

    def _drop_session(self, session: Session) -> None:
        for stream_id in list(session.streams):
            self._close_stream(stream_id)
        for upload in session.uploads.values():
            upload.path.unlink(missing_ok=True)
        for subscribers in self.subscribers.values():
            subscribers.discard(session.identity)
        self.sessions.pop(session.identity, None)

    # -- uploads (§4.2) ------------------------------------------------------------------------------------
    def _on_upload(self, session: Session, message: Message) -> None:
        size, digest = message["size"], message["sha256"].lower()
        if size > self.config.max_upload:
            raise ProtocolError(
                "too-large", f"upload of {size} bytes exceeds the {self.config.max_upload}-byte limit"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ProtocolError("bad-message", "UPLOAD.sha256 must be 64 hex digits")
        if sum(not u.complete for u in session.uploads.values()) >= self.config.max_uploads:
            raise ProtocolError("busy", "too many unfinished uploads in this session; finish one first")
        suffix = Path(message["name"]).suffix.lower()
        suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
        upload_id = secrets.token_hex(8)
        path = self.state_dir / "uploads" / f"{upload_id}{suffix}"
        path.touch()
        session.uploads[upload_id] = Upload(upload_id, path, size, digest)
        log.info("%s: UPLOAD %s (%d bytes) as %s", session.label(), message["name"][:64], size, upload_id)
        self._reply(session, message, "UPLOAD_READY", upload=upload_id, chunk=self.config.chunk, credit=4)
        if size == 0:
            self._finish_upload(session, session.uploads[upload_id], message)

    def _on_upload_chunk(self, session: Session, message: Message) -> None:
        upload = session.uploads.get(message["upload"])
        if upload is None or upload.complete:
            raise ProtocolError(
                "not-found", f"no upload {message['upload'][:32]!r} in progress in this session"
            )
        data = message.payloads[0].buffer
        if message["offset"] != upload.received:
            raise ProtocolError("invalid", f"chunk at offset {message['offset']}, expected {upload.received}")
        if len(data) > self.config.chunk or upload.received + len(data) > upload.size:
            raise ProtocolError("too-large", "chunk larger than the chunk limit or past the declared size")
        with open(upload.path, "ab") as fh:
            fh.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        self._reply(session, message, "UPLOAD_ACK", upload=upload.id, received=upload.received)
        if upload.received == upload.size:
            self._finish_upload(session, upload, message)

    def _finish_upload(self, session: Session, upload: Upload, message: Message) -> None:
        if upload.digest.hexdigest() != upload.sha256:
            upload.path.unlink(missing_ok=True)
            del session.uploads[upload.id]
            raise ProtocolError("checksum", "the uploaded bytes do not match the SHA-256 given; upload again")
        upload.complete = True
        self._reply(session, message, "UPLOADED", upload=upload.id, size=upload.size)

    # -- jobs (§4.3 - §4.5) --------------------------------------------------------------------------------
    def _media_path(self, session: Session, ref: dict, job_dir: Path, role: str) -> Path:
        if "path" in ref:
            return confine(ref["path"], self.roots)
        upload = session.uploads.get(ref["upload"])
        if upload is None or not upload.complete:
            raise ProtocolError("not-found", f"no finished upload {ref['upload'][:32]!r} in this session")
        target = job_dir / f"{role}{upload.path.suffix}"
        shutil.move(upload.path, target)
        del session.uploads[upload.id]
        return target

    def _check_options(self, options: dict) -> dict:
        for name, value in options.items():
            expected = _OPTION_TYPES.get(name)
            if expected is None:
                raise ProtocolError(
                    "invalid", f"unknown option {str(name)[:32]!r}; known: {', '.join(OPTION_FIELDS)}"
                )
            if type(value) is not expected:
                raise ProtocolError("invalid", f"option {name} must be a {expected.__name__}")
        expression = options.get("expression", "neutral")
        if expression not in EXPRESSIONS:
            options = dict(options, expression=str(confine(expression, self.roots)))
        return options

    def _on_submit(self, session: Session, message: Message) -> None:
        waiting = sum(1 for _, _, job in self.queue if job not in self.running) + len(self.pending)
        if waiting >= self.config.max_queue:
            raise ProtocolError("busy", "the job queue is full; try again later")
        job_id = secrets.token_hex(8)
        job_dir = self.state_dir / "jobs" / job_id
        job_dir.mkdir()
        try:
            spec = self._job_spec(session, message, job_dir)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        probe = self._probes.submit(media.probe, Path(spec["video"]))
        self.pending.append(PendingSubmit(session.identity, message, job_id, job_dir, spec, probe))

    def _finish_submits(self) -> None:
        """Answer the SUBMITs whose probe has ended: journal the job and reply ACCEPTED, or reply ERROR."""
        done, waiting = [], []
        for pending in self.pending:  # one look at each probe: it may end meanwhile
            (done if pending.probe.done() else waiting).append(pending)
        self.pending = waiting
        for pending in done:
            session = self.sessions.get(pending.identity)
            if session is None:  # the client left before ACCEPTED: no one knows of this job
                shutil.rmtree(pending.job_dir, ignore_errors=True)
                continue
            with self._answering(session, pending.message.req):
                try:
                    record = self._admit(session, pending, pending.probe.result())
                except BaseException:
                    shutil.rmtree(pending.job_dir, ignore_errors=True)
                    raise
                job_id = record.id
                heapq.heappush(self.queue, (-record.priority, record.seq, job_id))
                self.subscribers.setdefault(job_id, set()).add(session.identity)
                position = sum(1 for _, _, job in self.queue if job != job_id and self._queued(job))
                log.info(
                    "%s: SUBMIT accepted as job %s (clip %s)", session.label(), job_id, record.spec["video"]
                )
                self._reply(session, pending.message, "ACCEPTED", job=job_id, position=position)

    def _job_spec(self, session: Session, message: Message, job_dir: Path) -> dict:
        """The job a SUBMIT asks for, checked as far as it can be without reading the clip."""
        options = self._check_options(message.get("options", {}))
        codec_name = options.get("codec", "h264")
        if codec_name not in CODECS:
            raise ProtocolError("invalid", f"codec {codec_name[:32]!r}: expected one of {', '.join(CODECS)}")
        video = self._media_path(session, message["clip"], job_dir, "clip")
        audio = self._media_path(session, message["audio"], job_dir, "audio")
        spec = {
            "video": str(video),
            "audio": str(audio),
            "output": str(job_dir / f"result{media.default_extension(codec_name)}"),
            "start": message.get("start", 0),
            "end": message.get("end"),
            "audio_offset": str(codec.from_rational(message.get("audio_offset", [0, 1]))),
            "engine": message.get("engine", "auto"),
            "options": options,
        }
        request_from_spec(spec).validate()
        return spec

    def _admit(self, session: Session, pending: PendingSubmit, info: media.VideoInfo) -> JobRecord:
        """Check the range and rate against the probed clip, then journal the job (§8.1: committed before
        ACCEPTED goes out)."""
        message, spec = pending.message, pending.spec
        if message.get("rate") is not None and codec.from_rational(message["rate"]) != info.rate:
            raise ProtocolError(
                "invalid",
                f"the clip's frame rate is {info.rate}, not {codec.from_rational(message['rate'])}: "
                "frame numbers would name other frames (§4.3)",
            )
        end = info.frame_count if spec["end"] is None else spec["end"]
        if spec["start"] >= info.frame_count or end > info.frame_count:
            raise ProtocolError(
                "invalid", f"frames [{spec['start']}, {end}) are outside the clip's {info.frame_count} frames"
            )
        return self.journal.add(
            pending.job_id, spec, priority=message.get("priority", 0), client=session.label()
        )

    def _queued(self, job_id: str) -> bool:
        record = self.journal.get(job_id)
        return record is not None and record.state == "queued"

    def _job(self, job_id: str) -> JobRecord:
        record = self.journal.get(job_id)
        if record is None:
            raise ProtocolError("not-found", f"no job {job_id[:32]!r} on this server")
        return record

    def _progress_fields(self, record: JobRecord) -> dict:
        running = self.running.get(record.id)
        fields = {
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
        return fields

    def _broadcast(self, record: JobRecord) -> None:
        frames = codec.encode("PROGRESS", 0, **self._progress_fields(record))
        for identity in list(self.subscribers.get(record.id, ())):
            if identity in self.sessions:
                self._send(identity, frames)
        if record.state in codec.FINAL_STATES:
            self.subscribers.pop(record.id, None)

    def _on_watch(self, session: Session, message: Message) -> None:
        record = self._job(message["job"])
        if record.state not in codec.FINAL_STATES:
            self.subscribers.setdefault(record.id, set()).add(session.identity)
        self._reply(session, message, "PROGRESS", **self._progress_fields(record))

    def _on_status(self, session: Session, message: Message) -> None:
        workers = self.pool.describe()
        self._reply(
            session,
            message,
            "STATUS_REPLY",
            queue=[job for _, _, job in sorted(self.queue) if self._queued(job)],
            workers=workers,
            devices=sorted({w["device"] for w in workers if w["device"]}),
            jobs=self.journal.counts(),
            clients=len(self.sessions),
            streams=len(self.streams),
            uptime=time.monotonic() - self.started,
            server=f"retalk {retalk.__version__}",
        )

    def _on_list(self, session: Session, message: Message) -> None:
        records = self.journal.list(message.get("states"), min(message.get("limit", 100), 1000))
        self._reply(session, message, "JOBS", jobs=[record.summary() for record in records])

    def _on_cancel(self, session: Session, message: Message) -> None:
        record = self._job(message["job"])
        log.info("%s: CANCEL job %s (%s)", session.label(), record.id, record.state)
        if record.state == "queued":
            self.journal.finish(record.id, "cancelled")
            self._broadcast(self._job(record.id))
        elif record.state == "running":
            self.pool.cancel(record.id)
        else:
            raise ProtocolError("invalid", f"job {record.id} is already {record.state}; nothing to cancel")
        self._reply(session, message, "CANCELLED", job=record.id, state=self._job(record.id).state)

    # -- worker events -------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self.queue and self.pool.capacity() > 0:
            _, _, job_id = heapq.heappop(self.queue)
            record = self.journal.get(job_id)
            if record is None or record.state != "queued":
                continue  # cancelled while queued
            attempt = self.journal.start(job_id)
            self.running[job_id] = Running(attempt)
            self.pool.submit(job_id, record.spec)
            log.info("job %s started (attempt %d)", job_id, attempt)
            self._broadcast(self._job(job_id))

    def _on_worker(self, event: WorkerEvent) -> None:
        job_id = event.job
        running = self.running.get(job_id)
        if running is None:
            return
        if event.kind == "progress":
            if event.data["stage"] != running.stage:
                running.stage, running.stage_started = event.data["stage"], time.monotonic()
            running.done, running.total = event.data["done"], event.data["total"]
            self._broadcast(self._job(job_id))
            return
        del self.running[job_id]
        record = self._job(job_id)
        if event.kind == "done":
            self.journal.finish(job_id, "done", result=event.data)
            log.info("job %s done (%d frames)", job_id, event.data.get("frames", 0))
        elif event.kind == "cancelled":
            self.journal.finish(job_id, "cancelled")
            Path(record.spec["output"]).unlink(missing_ok=True)
            log.info("job %s cancelled", job_id)
        elif event.kind == "failed" and event.data["code"] in FINAL_FAILURES:
            error = {"code": event.data["code"], "message": event.data["message"], "retryable": False}
            self.journal.finish(job_id, "failed", error=error)
            log.info("job %s failed: %s", job_id, event.data["message"])
        else:  # a worker that died or hit an internal fault: retried a bounded number of times (§8.2)
            reason = event.data["message"]
            if event.data.get("traceback"):
                log.error("job %s: worker fault\n%s", job_id, event.data["traceback"])
            if record.attempts < self.config.max_attempts:
                log.warning("job %s: %s; retrying (attempt %d failed)", job_id, reason, record.attempts)
                self.journal.requeue(job_id)
                heapq.heappush(self.queue, (-record.priority, record.seq, job_id))
            else:
                message = f"{reason}; gave up after {record.attempts} attempts"
                self.journal.finish(
                    job_id, "failed", error={"code": "failed", "message": message, "retryable": False}
                )
                log.error("job %s failed: %s", job_id, message)
        self._broadcast(self._job(job_id))

    # -- streams (§4.6 - §4.8, §5) -------------------------------------------------------------------------
    def _finished_job(self, job_id: str) -> JobRecord:
        record = self._job(job_id)
        if record.state == "expired":
            raise ProtocolError("expired", f"job {record.id}'s result was removed after its retention period")
        if record.state in ("queued", "running"):
            raise ProtocolError("not-ready", f"job {record.id} is {record.state}; ask again when it is done")
        if record.state != "done":
            raise ProtocolError("invalid", f"job {record.id} ended {record.state}: it has no result")
        return record

    def _open_stream(self, session: Session, message: Message, messages, credit: int, **fields) -> None:
        if len(session.streams) >= self.config.max_streams:
            raise ProtocolError("busy", f"at most {self.config.max_streams} open streams per session")
        stream_id = secrets.token_hex(6)
        window = max(1, min(credit, self.config.max_credit))
        stream = Stream(
            stream_id,
            session.identity,
            message.req,
            messages(stream_id),
            window,
            self.context,
            self._pump_endpoint,
        )
        self.streams[stream_id] = stream
        session.streams.add(stream_id)
        self._reply(session, message, "STREAM", stream=stream_id, credit=window, **fields)
        stream.start()

    def _on_render(self, session: Session, message: Message) -> None:
        record = self._finished_job(message["job"])
        result = record.result
        frames, rate = result["frames"], Fraction(*result["rate"])
        first = message.get("first")
        first = 0 if first is None else first
        last = message.get("last")
        last = frames - 1 if last is None else last
        if not first <= last < frames:
            raise ProtocolError(
                "invalid", f"frames [{first}, {last}] are outside the result's 0..{frames - 1}"
            )
        pixel_format = message.get("format", "rgb8")
        if pixel_format not in codec.PIXEL_FORMATS:
            raise ProtocolError(
                "invalid", f"format {pixel_format[:16]!r}: expected {', '.join(codec.PIXEL_FORMATS)}"
            )
        audio_rate = message.get("audio_rate", 48000)
        if not 8000 <= audio_rate <= 192000:
            raise ProtocolError("invalid", f"audio_rate {audio_rate}: expected 8000..192000")
        path = Path(record.spec["output"])
        info = media.probe(path)
        log.info(
            "%s: RENDER job %s frames %d..%d as %s", session.label(), record.id, first, last, pixel_format
        )

        def messages(stream_id: str):
            return render_messages(
                path,
                stream_id,
                first=first,
                last=last,
                rate=rate,
                pixel_format=pixel_format,
                audio=message.get("audio", True),
                audio_rate=audio_rate,
            )

        self._open_stream(
            session,
            message,
            messages,
            message.get("credit", 8),
            job=record.id,
            first=first,
            last=last,
            frames=last + 1 - first,
            width=info.width,
            height=info.height,
            rate=codec.to_rational(rate),
            format=pixel_format,
        )

    def _on_fetch(self, session: Session, message: Message) -> None:
        record = self._finished_job(message["job"])
        path = Path(record.spec["output"])
        log.info("%s: FETCH job %s", session.label(), record.id)
        self._open_stream(
            session,
            message,
            lambda stream_id: file_messages(path, stream_id, self.config.chunk),
            message.get("credit", 8),
            job=record.id,
            size=record.result["size"],
            sha256=record.result["sha256"],
            codec=record.result["codec"],
            extension=path.suffix,
        )

    def _session_stream(self, session: Session, stream_id: str) -> Stream:
        if stream_id not in session.streams:
            raise ProtocolError("not-found", f"no open stream {stream_id[:32]!r} in this session")
        return self.streams[stream_id]

    def _on_credit(self, session: Session, message: Message) -> None:
        self._session_stream(session, message["stream"]).add_credit(message["credit"])

    def _on_abort(self, session: Session, message: Message) -> None:
        stream = self._session_stream(session, message["stream"])
        self._close_stream(stream.id)
        self._reply(session, message, "END", stream=stream.id, count=stream.sent)

    def _close_stream(self, stream_id: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.stop()
        session = self.sessions.get(stream.identity)
        if session is not None:
            session.streams.discard(stream_id)

    def _drain_pumps(self) -> None:
        for _ in range(256):
            try:
                frames = self.pumps.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            stream = self.streams.get(frames[0].bytes.decode())
            if stream is None:
                continue  # aborted or its client is gone: dropped
            kind = frames[1].bytes
            if kind == b"data":
                stream.sent += 1
                self._send(stream.identity, frames[2:])
                continue
            self._close_stream(stream.id)
            if kind == b"end":
                self._send(stream.identity, codec.encode("END", 0, stream=stream.id, count=stream.sent))
            else:
                error = ProtocolError(frames[2].bytes.decode(), frames[3].bytes.decode())
                log.warning("stream %s failed: %s", stream.id, error.message)
                self._error(stream.identity, error, stream.req)

    # -- housekeeping --------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.config.heartbeat:
            self._last_beat = now
            beat = codec.encode("HEARTBEAT")
            for session in list(self.sessions.values()):
                if now - session.last_seen > self.config.timeout:
                    log.info(
                        "%s: gone (silent for %.1f s): %d stream(s) dropped, its jobs continue",
                        session.label(),
                        now - session.last_seen,
                        len(session.streams),
                    )
                    self._drop_session(session)
                elif session.hello:
                    self._send(session.identity, beat)
        if now - self._last_sweep >= min(10.0, self.config.retention / 2):
            self._last_sweep = now
            for record in self.journal.expire(time.time() - self.config.retention):
                shutil.rmtree(self.state_dir / "jobs" / record.id, ignore_errors=True)
                log.info("job %s expired: result removed after the retention period", record.id)

"""The retalk server: one ROUTER socket, one event loop, and the parts it drives (PROTOCOL.md).

- sessions.py: the sessions, what is sent to them (``Outbox``), their uploads (§4.1, §4.2, §4.9);
- jobs.py: SUBMIT, the journal and the queue, the worker pool's events, WATCH/LIST/CANCEL (§4.3-§4.5, §8);
- streams.py: RENDER/FETCH results, credit and abort (§4.6-§4.8, §5).

The loop is the only thread that touches the socket, the journal and the queue; result streams pump from
their own threads and workers run in their own processes (workers.py). Every client message is answered
inside a guard: whatever a client sends, the answer is at worst an ERROR carrying its ``req`` (§7.1).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from retalk_protocol import codec
from retalk_protocol import options as job_options
from retalk_protocol.codec import Message, ProtocolError
from retalk_server.config import ServerConfig
from retalk_server.jobs import Jobs
from retalk_server.journal import Journal
from retalk_server.logs import guard
from retalk_server.sessions import Outbox, Session, Uploads, new_session
from retalk_server.streams import Streams
from retalk_server.workers import ProcessWorkerPool, WorkerPool
from zmq.auth.thread import ThreadAuthenticator

import retalk
from retalk.errors import InputError

log = guard()


class Server:
    def __init__(self, config: ServerConfig, pool: WorkerPool | None = None):
        config.check()
        self.config = config
        self.roots = [Path(root).resolve() for root in config.media_roots]
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        self.context = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.router = self._bind()
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sessions: dict[bytes, Session] = {}
        self.outbox = Outbox(self.router)
        self.pool = pool or ProcessWorkerPool(
            config.workers, runner=config.runner, device=config.device, precision=config.precision
        )
        self.uploads = Uploads(
            self.state_dir / "uploads",
            self.outbox,
            max_size=config.max_upload,
            chunk=config.chunk,
            per_session=config.max_uploads,
        )
        self.jobs = Jobs(
            config,
            self.journal,
            self.pool,
            self.uploads,
            self.outbox,
            self.sessions,
            self.roots,
            self.state_dir / "jobs",
        )
        self.streams = Streams(
            self.context,
            self.outbox,
            self.sessions,
            self.jobs.finished,
            max_credit=config.max_credit,
            max_streams=config.max_streams,
            chunk=config.chunk,
        )
        self.started = time.monotonic()
        self._last_beat = self._last_sweep = 0.0
        # Requests by type (§9: the messages a client sends); HEARTBEAT only refreshes `last_seen`.
        self._handlers = {
            "HELLO": self._on_hello,
            "HEARTBEAT": lambda session, message: None,
            "BYE": self._on_bye,
            "UPLOAD": self.uploads.on_upload,
            "UPLOAD_CHUNK": self.uploads.on_chunk,
            "SUBMIT": self.jobs.on_submit,
            "WATCH": self.jobs.on_watch,
            "STATUS": self._on_status,
            "LIST": self.jobs.on_list,
            "CANCEL": self.jobs.on_cancel,
            "RENDER": self.streams.on_render,
            "FETCH": self.streams.on_fetch,
            "CREDIT": self.streams.on_credit,
            "ABORT": self.streams.on_abort,
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
        phases = (
            self.streams.drain,
            self.jobs.finish_submits,
            self.jobs.poll_workers,
            self.jobs.dispatch,
            self._housekeeping,
        )
        while not stop.is_set():
            poller = zmq.Poller()
            poller.register(self.router, zmq.POLLIN)
            poller.register(self.streams.pumps, zmq.POLLIN)
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
            for phase in phases:
                try:
                    phase()
                except Exception:  # a fault in one turn is logged; the server stays up for the next
                    log.exception("internal error in %s", phase.__name__)

    def close(self) -> None:
        self.streams.close()
        self.jobs.close()
        self.pool.close()
        if self.auth is not None:
            self.auth.stop()
        self.router.close()
        self.context.term()
        self.journal.close()

    # -- client messages (§7.1: the order of the checks) ---------------------------------------------------
    def _on_client(self, frames: list) -> None:
        identity = frames[0].bytes
        session = self.sessions.get(identity)
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                error = ProtocolError("busy", "too many client sessions; try again later")
                self.outbox.error(identity, error, codec.read_req(frames[1]) if len(frames) > 1 else 0)
                return
            session = self.sessions[identity] = new_session(identity, frames, self.auth is not None)
        session.last_seen = time.monotonic()
        try:
            message = codec.decode(frames[1:], sender="client")
        except ProtocolError as err:
            log.info("%s: %s refused: %s", session.label(), err.code, err.message)
            self.outbox.error(identity, err, err.req)
            return
        with self.outbox.answering(session, message.req):
            if not session.hello and message.type not in ("HELLO", "HEARTBEAT", "BYE"):
                raise ProtocolError("hello-required", f"send HELLO before {message.type} (§4.1)")
            self._handlers[message.type](session, message)

    def _on_hello(self, session: Session, message: Message) -> None:
        """WELCOME (§4.1); a HELLO that draws an ERROR leaves the session as it was."""
        common = set(message["versions"]) & set(codec.SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                "unsupported-version",
                f"no common protocol version: client speaks {message['versions'][:16]}, "
                f"server speaks {list(codec.SUPPORTED_VERSIONS)}",
                supported=list(codec.SUPPORTED_VERSIONS),
            )
        session.greet(message.get("client", "?"))
        log.info("%s: HELLO", session.label())
        config = self.config
        self.outbox.reply(
            session,
            message,
            "WELCOME",
            version=max(common),
            server=f"retalk {retalk.__version__}",
            engines=list(job_options.ENGINE.choices),
            formats=list(codec.PIXEL_FORMATS),
            codecs=list(job_options.JOB_OPTIONS["codec"].choices),
            options=[option.describe() for option in job_options.JOB_OPTIONS.values()],
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
        """The session ends (BYE or silence, §4.9): its streams and unused uploads go; its jobs continue."""
        self.streams.drop(session)
        self.uploads.drop(session)
        self.jobs.forget(session)
        self.sessions.pop(session.identity, None)

    def _on_status(self, session: Session, message: Message) -> None:
        workers = self.pool.describe()
        self.outbox.reply(
            session,
            message,
            "STATUS_REPLY",
            queue=self.jobs.queued(),
            workers=workers,
            devices=sorted({w["device"] for w in workers if w["device"]}),
            jobs=self.journal.counts(),
            clients=len(self.sessions),
            streams=len(self.streams.streams),
            uptime=time.monotonic() - self.started,
            server=f"retalk {retalk.__version__}",
        )

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
                    self.outbox.send(session.identity, beat)
        if now - self._last_sweep >= min(10.0, self.config.retention / 2):
            self._last_sweep = now
            self.jobs.expire()

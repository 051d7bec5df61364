"""Sessions, what the server sends them, and their uploads (PROTOCOL.md §4.1, §4.2, §4.9, §7).

``Outbox`` is the only writer of the ROUTER socket: replies echo their request's ``req``, and whatever goes
wrong while a request is answered becomes its ERROR reply. ``Uploads`` receives the files a session sends
before it names them in a SUBMIT.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from retalk_protocol import codec
from retalk_protocol.codec import Message, ProtocolError
from retalk_server.errors import as_protocol_error
from retalk_server.logs import guard, printable

log = guard()

CLIENT_NAME_LIMIT = 64  # characters of HELLO's `client` kept (escaped) for logs and job records
UPLOAD_CREDIT = 4  # chunks a client may send ahead of their acknowledgement (§4.2)


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
    name: str = "?"  # HELLO's `client`, escaped (logs/logs.py)
    user: str = ""  # the CURVE public key the ZAP handler admitted, if any
    hello: bool = False
    streams: set[str] = field(default_factory=set)
    uploads: dict[str, Upload] = field(default_factory=dict)

    def label(self) -> str:
        key = f" key={self.user[:12]}" if self.user else ""
        return f"{self.name}@{self.identity.hex()[:16]}{key}"

    def greet(self, client_name) -> None:
        self.hello = True
        self.name = printable(client_name, CLIENT_NAME_LIMIT)


class Outbox:
    """Messages to clients over the ROUTER socket; never blocks (a full queue drops the message, §2.4)."""

    def __init__(self, router: zmq.Socket):
        self.router = router

    def send(self, identity: bytes, frames: list) -> None:
        try:
            self.router.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a message to %s: its queue is full", identity.hex()[:8])

    def reply(self, session: Session, message: Message, msg_type: str, **fields) -> None:
        """The reply to ``message``: it carries the request's ``req`` (§3.2)."""
        self.send(session.identity, codec.encode(msg_type, message.req, **fields))

    def error(self, identity: bytes, error: ProtocolError, req: int) -> None:
        self.send(identity, codec.encode_error(error, req))

    @contextmanager
    def answering(self, session: Session, req: int) -> Iterator[None]:
        """Whatever goes wrong while answering request ``req`` becomes its ERROR reply (§7); the server goes on."""
        try:
            yield
        except Exception as exc:
            error = as_protocol_error(exc)
            if error.code == "internal":
                log.exception("%s: internal error on request %d", session.label(), req)
            else:
                log.info("%s: %s refused: %s", session.label(), error.code, error.message)
            self.error(session.identity, error, req)


class Uploads:
    """UPLOAD / UPLOAD_CHUNK (§4.2): files kept in ``folder`` until a SUBMIT of their session takes them."""

    def __init__(self, folder: Path, outbox: Outbox, *, max_size: int, chunk: int, per_session: int):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outbox = outbox
        self.max_size, self.chunk, self.per_session = max_size, chunk, per_session

    def on_upload(self, session: Session, message: Message) -> None:
        size, digest = message["size"], message["sha256"].lower()
        if size > self.max_size:
            raise ProtocolError(
                "too-large", f"upload of {size} bytes exceeds the {self.max_size}-byte limit (§4.2)"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ProtocolError("bad-message", "UPLOAD.sha256 must be 64 hex digits (§4.2)")
        if sum(not u.complete for u in session.uploads.values()) >= self.per_session:
            raise ProtocolError("busy", "too many unfinished uploads in this session; finish one first")
        suffix = Path(message["name"]).suffix.lower()
        suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
        upload_id = secrets.token_hex(8)
        upload = Upload(upload_id, self.folder / f"{upload_id}{suffix}", size, digest)
        upload.path.touch()
        session.uploads[upload.id] = upload
        log.info("%s: UPLOAD %s (%d bytes) as %s", session.label(), message["name"], size, upload.id)
        self.outbox.reply(
            session, message, "UPLOAD_READY", upload=upload.id, chunk=self.chunk, credit=UPLOAD_CREDIT
        )
        if size == 0:
            self._finish(session, upload, message)

    def on_chunk(self, session: Session, message: Message) -> None:
        """One chunk; a refused chunk changes nothing, the upload goes on from ``received`` (§4.2)."""
        upload = session.uploads.get(message["upload"])
        if upload is None or upload.complete:
            raise ProtocolError(
                "not-found", f"no upload {message['upload'][:32]!r} in progress in this session"
            )
        data = message.payloads[0].buffer
        if message["offset"] != upload.received:
            raise ProtocolError(
                "invalid", f"chunk at offset {message['offset']}, expected {upload.received} (§4.2)"
            )
        if len(data) > self.chunk:
            raise ProtocolError(
                "too-large", f"chunk of {len(data)} bytes exceeds the {self.chunk}-byte limit"
            )
        if upload.received + len(data) > upload.size:
            raise ProtocolError(
                "too-large", f"chunk ends past the {upload.size} bytes declared in UPLOAD (§4.2)"
            )
        with open(upload.path, "ab") as fh:
            fh.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        self.outbox.reply(session, message, "UPLOAD_ACK", upload=upload.id, received=upload.received)
        if upload.received == upload.size:
            self._finish(session, upload, message)

    def _finish(self, session: Session, upload: Upload, message: Message) -> None:
        if upload.digest.hexdigest() != upload.sha256:
            self._discard(session, upload)
            raise ProtocolError("checksum", "the uploaded bytes do not match the SHA-256 given; upload again")
        upload.complete = True
        self.outbox.reply(session, message, "UPLOADED", upload=upload.id, size=upload.size)

    def take(self, session: Session, upload_id: str, target: Path) -> Path:
        """Move a finished upload of ``session`` to ``target`` (with the upload's suffix); it is used up."""
        upload = session.uploads.get(upload_id)
        if upload is None or not upload.complete:
            raise ProtocolError("not-found", f"no finished upload {upload_id[:32]!r} in this session")
        target = target.with_suffix(upload.path.suffix)
        shutil.move(upload.path, target)
        del session.uploads[upload.id]
        return target

    def drop(self, session: Session) -> None:
        """A session's unused uploads, removed (it sent BYE or went silent, §4.9)."""
        for upload in list(session.uploads.values()):
            self._discard(session, upload)

    @staticmethod
    def _discard(session: Session, upload: Upload) -> None:
        upload.path.unlink(missing_ok=True)
        del session.uploads[upload.id]


def new_session(identity: bytes, frames: list, curve: bool) -> Session:
    """A session for a client seen for the first time; with CURVE, named by the key ZAP admitted."""
    session = Session(identity, time.monotonic())
    if curve:
        try:
            session.user = frames[-1].get("User-Id") or ""
        except zmq.ZMQError:
            session.user = ""
    return session

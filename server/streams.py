"""Result streams (PROTOCOL.md §4.6-§4.8, §5): RENDER and FETCH open one, CREDIT tops it up, ABORT ends it.

Each stream has a pump thread, gated by the client's credit: it prepares at most one message ahead of its
credit and hands messages to the event loop over an inproc PUSH socket (ZeroMQ sockets belong to one thread);
the loop forwards the payload frames without copying.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import zmq
from retalk_protocol import codec
from retalk_protocol.codec import Message, ProtocolError
from retalk_server.errors import as_protocol_error
from retalk_server.journal import JobRecord
from retalk_server.logs import guard
from retalk_server.sessions import Outbox, Session

from retalk import media

log = guard()

AUDIO_SECONDS_PER_MESSAGE = 1  # §4.6: at most one second of audio per AUDIO message
FRAMES_PER_DECODE = 4  # frames decoded ahead: the pump's own buffer, independent of the clip length


def convert_pixels(frame: np.ndarray, pixel_format: str) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame in a wire layout (§4.6); rgb8 is the frame itself (no copy)."""
    if pixel_format == "rgb8":
        return frame
    if pixel_format == "rgb16":
        return frame.astype("<u2") * np.uint16(257)
    out = np.empty((*frame.shape[:2], 4), dtype="<f2")
    np.multiply(frame, np.float32(1 / 255), out=out[..., :3], casting="unsafe")
    out[..., 3] = 1.0
    return out


def render_messages(
    path: Path,
    stream: str,
    *,
    first: int,
    last: int,
    rate: Fraction,
    pixel_format: str,
    audio: bool,
    audio_rate: int,
) -> Iterator[list]:
    """AUDIO messages for frames [first, last] (inclusive), then one FRAME per frame (§4.6)."""
    if audio:
        samples = media.read_audio(
            path, start=first / rate, duration=(last + 1 - first) / rate, sample_rate=audio_rate
        )
        step = audio_rate * AUDIO_SECONDS_PER_MESSAGE
        for offset in range(0, len(samples), step):
            piece = samples[offset : offset + step].astype("<f4", copy=False)
            yield codec.encode(
                "AUDIO", 0, [piece], stream=stream, rate=audio_rate, channels=1, sample=offset, format="f32le"
            )
    for chunk in media.iter_frames(path, first, last + 1, chunk_size=FRAMES_PER_DECODE):
        for k, frame in enumerate(chunk.frames):
            index = chunk.start + k
            pixels = convert_pixels(frame, pixel_format)
            yield codec.encode(
                "FRAME",
                0,
                [pixels],
                stream=stream,
                index=index,
                time=codec.to_rational(index / rate),
                width=frame.shape[1],
                height=frame.shape[0],
                format=pixel_format,
            )


def file_messages(path: Path, stream: str, chunk_size: int) -> Iterator[list]:
    """CHUNK messages carrying the file (§4.7)."""
    with open(path, "rb") as fh:
        offset = 0
        while True:
            data = fh.read(chunk_size)
            if not data:
                return
            yield codec.encode("CHUNK", 0, [data], stream=stream, offset=offset)
            offset += len(data)


class Stream:
    """One open stream: its owner, its credit, and the pump thread producing its messages."""

    def __init__(
        self,
        stream_id: str,
        identity: bytes,
        req: int,
        messages: Iterator[list],
        credit: int,
        context: zmq.Context,
        endpoint: str,
    ):
        self.id = stream_id
        self.identity = identity
        self.req = req
        self.sent = 0
        self._messages = messages
        self._credit = threading.Semaphore(credit)
        self._window = (
            credit  # most credit outstanding at once (§5.2): a client cannot buy an unbounded queue
        )
        self._granted = credit
        self._used = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._context = context
        self._endpoint = endpoint
        self._thread = threading.Thread(target=self._pump, name=f"stream-{stream_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add_credit(self, credit: int) -> None:
        with self._lock:
            credit = max(0, min(credit, self._window - (self._granted - self._used)))
            self._granted += credit
        if credit:
            self._credit.release(credit)

    def stop(self) -> None:
        self._stopped.set()
        self._credit.release()

    def _pump(self) -> None:
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._endpoint)
        key = self.id.encode()
        try:
            for frames in self._messages:
                self._credit.acquire()
                with self._lock:
                    self._used += 1
                while not sock.poll(200, zmq.POLLOUT):  # the loop is busy or gone: stay stoppable
                    if self._stopped.is_set():
                        return
                if self._stopped.is_set():
                    return
                sock.send_multipart([key, b"data", *frames], zmq.NOBLOCK, copy=False)
            sock.send_multipart([key, b"end"])
        except Exception as err:
            error = as_protocol_error(err)
            if error.code == "internal":
                log.exception("stream %s: internal error", self.id)
            sock.send_multipart([key, b"error", error.code.encode(), error.message.encode()])
        finally:
            close = getattr(self._messages, "close", None)
            if close is not None:
                close()
            sock.close()


class Streams:
    """The open streams of every session."""

    def __init__(
        self,
        context: zmq.Context,
        outbox: Outbox,
        sessions: dict[bytes, Session],
        finished: Callable[[str], JobRecord],
        *,
        max_credit: int,
        max_streams: int,
        chunk: int,
    ):
        self.context, self.outbox, self.sessions, self.finished = context, outbox, sessions, finished
        self.max_credit, self.max_streams, self.chunk = max_credit, max_streams, chunk
        self.streams: dict[str, Stream] = {}
        self._endpoint = f"inproc://retalk-streams-{id(self)}"
        self.pumps = context.socket(zmq.PULL)  # the loop polls it: data the pumps produced
        self.pumps.bind(self._endpoint)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.stop()
        self.pumps.close()

    def _open(self, session: Session, message: Message, messages, credit: int, **fields) -> None:
        if len(session.streams) >= self.max_streams:
            raise ProtocolError("busy", f"at most {self.max_streams} open streams per session (§5.2)")
        stream_id = secrets.token_hex(6)
        window = max(1, min(credit, self.max_credit))
        stream = Stream(
            stream_id,
            session.identity,
            message.req,
            messages(stream_id),
            window,
            self.context,
            self._endpoint,
        )
        self.streams[stream_id] = stream
        session.streams.add(stream_id)
        self.outbox.reply(session, message, "STREAM", stream=stream_id, credit=window, **fields)
        stream.start()

    def on_render(self, session: Session, message: Message) -> None:
        record = self.finished(message["job"])
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
        path = record.spec.output
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

        self._open(
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

    def on_fetch(self, session: Session, message: Message) -> None:
        record = self.finished(message["job"])
        path = record.spec.output
        log.info("%s: FETCH job %s", session.label(), record.id)
        self._open(
            session,
            message,
            lambda stream_id: file_messages(path, stream_id, self.chunk),
            message.get("credit", 8),
            job=record.id,
            size=record.result["size"],
            sha256=record.result["sha256"],
            codec=record.result["codec"],
            extension=path.suffix,
        )

    def _of(self, session: Session, stream_id: str) -> Stream:
        if stream_id not in session.streams:
            raise ProtocolError("not-found", f"no open stream {stream_id[:32]!r} in this session")
        return self.streams[stream_id]

    def on_credit(self, session: Session, message: Message) -> None:
        self._of(session, message["stream"]).add_credit(message["credit"])

    def on_abort(self, session: Session, message: Message) -> None:
        stream = self._of(session, message["stream"])
        self.end(stream.id)
        self.outbox.reply(session, message, "END", stream=stream.id, count=stream.sent)

    def end(self, stream_id: str) -> None:
        """Stop a stream and forget it (its client aborted it, left, or it ended)."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.stop()
        session = self.sessions.get(stream.identity)
        if session is not None:
            session.streams.discard(stream_id)

    def drop(self, session: Session) -> None:
        """A session gone: its streams stop."""
        for stream_id in list(session.streams):
            self.end(stream_id)

    def drain(self) -> None:
        """Forward what the pumps produced (a bounded batch: clients and workers get their turn)."""
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
                self.outbox.send(stream.identity, frames[2:])
                continue
            self.end(stream.id)
            if kind == b"end":
                self.outbox.send(stream.identity, codec.encode("END", 0, stream=stream.id, count=stream.sent))
            else:
                error = ProtocolError(frames[2].bytes.decode(), frames[3].bytes.decode())
                log.warning("stream %s failed: %s", stream.id, error.message)
                self.outbox.error(stream.identity, error, stream.req)

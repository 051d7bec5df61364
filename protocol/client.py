"""The RTP/1 client (PROTOCOL.md): one DEALER socket, synchronous calls, credit-managed result streams.

Pure Python on pyzmq + msgpack, valid on Python 3.8: the retalk command and the host plug-ins use this one class.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from fractions import Fraction

import zmq

from . import codec
from .codec import Message, ProtocolError

_EVENT_BACKLOG = 1000  # progress events kept while nobody reads them; the oldest go first


class Client:
    """A session with a retalk server.

    ``server_key`` (z85 public key of the server) turns CURVE on; ``client_key`` is then this client's
    ``(public, secret)`` pair, whose public half must be in the server's allow-list (§2.2).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "retalk-client",
        server_key: bytes | None = None,
        client_key: tuple | None = None,
        timeout: float = 30.0,
        max_message: int = 256 * 1024 * 1024,
        context: zmq.Context | None = None,
    ):
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.welcome: dict = {}
        self.events = collections.deque(maxlen=_EVENT_BACKLOG)
        self._heartbeat = 1.0
        self._next_req = 1
        self._streams: dict = {}
        self._stream_of_req: dict = {}
        self._last_send = 0.0
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 500)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message)
        if server_key is not None:
            if client_key is None:
                client_key = zmq.curve_keypair()
            self._socket.curve_serverkey = server_key
            self._socket.curve_publickey, self._socket.curve_secretkey = client_key
        self._socket.connect(endpoint)

    # -- session ---------------------------------------------------------------------------------------------
    def connect(self) -> dict:
        """HELLO → WELCOME (§4.1); returns the server's capabilities."""
        reply = self.request("HELLO", versions=list(codec.SUPPORTED_VERSIONS), client=self.name)
        self.welcome = dict(reply.fields)
        self._heartbeat = float(self.welcome.get("heartbeat", 1.0))
        return self.welcome

    def close(self) -> None:
        if self._socket.closed:
            return
        if self._socket.poll(0, zmq.POLLOUT):  # BYE only where it can go now; never block on a dead link
            self._socket.send_multipart(codec.encode("BYE"), zmq.NOBLOCK)
        self._socket.close()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------------
    def _send(self, frames: list) -> None:
        # A DEALER blocks while it has no connection (server down, CURVE key refused): wait bounded instead.
        if not self._socket.poll(int(self.timeout * 1000), zmq.POLLOUT):
            raise ProtocolError(
                "timeout",
                f"cannot reach {self.endpoint}: is `retalk serve` running there, and is this client's key allowed?",
            )
        self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        self._last_send = time.monotonic()

    def _receive(self, deadline: float) -> Message:
        """The next message, sending heartbeats while waiting; raises ProtocolError("timeout") at ``deadline``."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ProtocolError(
                    "timeout",
                    f"no reply from {self.endpoint} in time; is `retalk serve` running there?",
                )
            if now - self._last_send >= self._heartbeat:
                self._send(codec.encode("HEARTBEAT"))
            wait = min(deadline - now, self._heartbeat)
            if self._socket.poll(max(1, int(wait * 1000)), zmq.POLLIN):
                frames = self._socket.recv_multipart(copy=False)
                message = codec.decode(frames)
                message.payloads = [frame.buffer for frame in message.payloads]
                if message.type != "HEARTBEAT":
                    return message

    def _dispatch(self, message: Message) -> None:
        """Park a message nobody is waiting for right now: events, or data of an open stream."""
        stream = message.get("stream") if message.type != "STREAM" else None
        if stream is None and message.type == "ERROR":
            stream = self._stream_of_req.get(message.req)
        if stream is not None and stream in self._streams:
            self._streams[stream].append(message)
        elif message.type == "PROGRESS" and message.req == 0:
            self.events.append(message)
        # anything else answers a request that already timed out: dropped

    def request(self, msg_type: str, payloads: tuple = (), timeout: float | None = None, **fields) -> Message:
        """Send a request and return its reply; an ERROR reply raises ProtocolError with its code (§7)."""
        try:
            return self._request_once(msg_type, payloads, timeout, fields)
        except ProtocolError as err:
            if err.code != "hello-required" or msg_type == "HELLO":
                raise
        # The server forgot this session (it restarted, or we were idle past its timeout): HELLO again and
        # repeat the request once.
        self.connect()
        return self._request_once(msg_type, payloads, timeout, fields)

    def _request_once(self, msg_type: str, payloads: tuple, timeout: float | None, fields: dict) -> Message:
        req = self._next_req
        self._next_req += 1
        self._send(codec.encode(msg_type, req, payloads, **fields))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            message = self._receive(deadline)
            if message.req != req:
                self._dispatch(message)
                continue
            if message.type == "ERROR":
                raise ProtocolError(
                    message["code"], message["message"], message["retryable"], req, **_extra(message.fields)
                )
            return message

    def next_event(self, timeout: float | None = None) -> Message | None:
        """The next PROGRESS event (§4.4), or None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.events:
            try:
                self._dispatch(self._receive(deadline))
            except ProtocolError as err:
                if err.code == "timeout":
                    return None
                raise
        return self.events.popleft()

    # -- jobs ------------------------------------------------------------------------------------------------
    def upload(self, path: str, timeout: float | None = None) -> str:
        """Upload a local file (§4.2); returns the upload id to use as ``{"upload": id}`` in submit()."""
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        ready = self.request("UPLOAD", name=os.path.basename(path), size=size, sha256=digest.hexdigest())
        upload, chunk, window = ready["upload"], max(1, ready["chunk"]), max(1, ready["credit"])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sent = acked = 0
        with open(path, "rb") as fh:
            while True:
                while sent < size and (sent - acked) < window * chunk:
                    data = fh.read(chunk)
                    self._send(codec.encode("UPLOAD_CHUNK", 0, [data], upload=upload, offset=sent))
                    sent += len(data)
                message = self._receive(deadline)
                if message.type == "UPLOAD_ACK" and message["upload"] == upload:
                    acked = message["received"]
                elif message.type == "UPLOADED" and message["upload"] == upload:
                    return upload
                elif message.type == "ERROR" and message.req in (0, ready.req):
                    raise ProtocolError(message["code"], message["message"], message["retryable"])
                else:
                    self._dispatch(message)

    def submit(
        self,
        clip,
        audio,
        *,
        start: int = 0,
        end: int | None = None,
        rate: Fraction | None = None,
        audio_offset: Fraction = Fraction(0),
        engine: str = "auto",
        options: dict | None = None,
        priority: int = 0,
    ) -> str:
        """SUBMIT (§4.3). ``clip``/``audio``: a path on the server (str) or ``{"upload": id}``. Returns the job id."""
        reply = self.request(
            "SUBMIT",
            clip=_media_ref(clip),
            audio=_media_ref(audio),
            start=start,
            end=end,
            rate=None if rate is None else codec.to_rational(rate),
            audio_offset=codec.to_rational(audio_offset),
            engine=engine,
            options=dict(options or {}),
            priority=priority,
        )
        return reply["job"]

    def watch(self, job: str) -> Message:
        """Subscribe to a job's PROGRESS events; returns its current state (§4.5)."""
        return self.request("WATCH", job=job)

    def wait(self, job: str, timeout: float | None = None, on_progress=None) -> dict:
        """Block until the job ends; returns its final PROGRESS fields. ``on_progress(fields)`` sees each event."""
        current = self.watch(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if on_progress is not None:
                on_progress(current.fields)
            if current["state"] in codec.FINAL_STATES:
                return current.fields
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ProtocolError("timeout", f"job {job} did not finish in {timeout} s")
            event = self.next_event(
                timeout=self._heartbeat * 3 if left is None else min(left, self._heartbeat * 3)
            )
            if event is None:
                current = self.watch(job)  # a quiet server: ask again (also re-subscribes after a restart)
            elif event["job"] == job:
                current = event

    def status(self) -> dict:
        return dict(self.request("STATUS").fields)

    def list_jobs(self, states: list | None = None, limit: int = 100) -> list:
        fields = {"limit": limit}
        if states:
            fields["states"] = list(states)
        return self.request("LIST", **fields)["jobs"]

    def cancel(self, job: str) -> str:
        """CANCEL (§4.5); returns the job's state after the request."""
        return self.request("CANCEL", job=job)["state"]

    # -- results ---------------------------------------------------------------------------------------------
    def _stream(self, msg_type: str, credit: int, timeout: float | None, **fields):
        """Open a stream and yield its data messages, topping up credit as they are consumed (§5)."""
        reply = self.request(msg_type, credit=credit, **fields)
        stream = reply["stream"]
        window = max(1, reply["credit"])
        self._streams[stream] = collections.deque()
        self._stream_of_req[reply.req] = stream
        ended = False
        try:
            yield reply
            consumed = 0
            wait = self.timeout if timeout is None else timeout
            while True:
                queue = self._streams[stream]
                deadline = time.monotonic() + wait
                while not queue:
                    message = self._receive(deadline)
                    if message.get("stream") == stream or (
                        message.type == "ERROR" and message.req == reply.req
                    ):
                        queue.append(message)
                    else:
                        self._dispatch(message)
                message = queue.popleft()
                if message.type == "ERROR":
                    ended = True
                    raise ProtocolError(
                        message["code"], message["message"], message["retryable"], message.req
                    )
                if message.type == "END":
                    ended = True
                    return
                yield message
                consumed += 1
                if consumed * 2 >= window:
                    self._send(codec.encode("CREDIT", 0, stream=stream, credit=consumed))
                    consumed = 0
        finally:
            if not ended and not self._socket.closed:
                self._send(codec.encode("ABORT", 0, stream=stream))
            del self._streams[stream]
            del self._stream_of_req[reply.req]

    def render(
        self,
        job: str,
        first: int | None = None,
        last: int | None = None,
        *,
        format: str = "rgb8",
        audio: bool = True,
        audio_rate: int = 48000,
        credit: int = 8,
        timeout: float | None = None,
    ):
        """RENDER (§4.6): yields the STREAM reply, then AUDIO and FRAME messages in order.

        Payloads are zero-copy buffers; ``frame_array(message)`` views one as a numpy array.
        """
        return self._stream(
            "RENDER",
            credit,
            timeout,
            job=job,
            first=first,
            last=last,
            format=format,
            audio=audio,
            audio_rate=audio_rate,
        )

    def fetch(self, job: str, path: str, *, credit: int = 8, timeout: float | None = None) -> dict:
        """FETCH (§4.7): write the job's encoded file to ``path`` (atomically), checking its SHA-256."""
        messages = self._stream("FETCH", credit, timeout, job=job)
        info = next(messages)
        partial = f"{path}.part{os.getpid()}"
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as fh:
                for message in messages:
                    if message["offset"] != fh.tell():
                        raise ProtocolError(
                            "bad-message", "chunk at offset {} out of order".format(message["offset"])
                        )
                    fh.write(message.payloads[0])
                    digest.update(message.payloads[0])
            if digest.hexdigest() != info["sha256"]:
                raise ProtocolError("checksum", "the fetched file's SHA-256 does not match; fetch again")
            os.replace(partial, path)
        finally:
            messages.close()
            if os.path.exists(partial):
                os.remove(partial)
        return dict(info.fields)


def _media_ref(value) -> dict:
    if isinstance(value, dict):
        return value
    return {"path": os.fspath(value)}


def _extra(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in ("code", "message", "retryable")}


def frame_array(message: Message):
    """A FRAME's pixels as a read-only numpy array (H, W, C) without copying (§4.6 layouts). Needs numpy."""
    import numpy as np

    dtype, channels = {"rgb8": ("u1", 3), "rgb16": ("<u2", 3), "rgba-half": ("<f2", 4)}[message["format"]]
    return np.frombuffer(message.payloads[0], dtype=dtype).reshape(
        message["height"], message["width"], channels
    )


def audio_array(message: Message):
    """An AUDIO message's samples as a float32 numpy array without copying. Needs numpy."""
    import numpy as np

    return np.frombuffer(message.payloads[0], dtype="<f4")

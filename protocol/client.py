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
CONNECT_TIMEOUT = 5.0  # seconds HELLO waits for WELCOME: a server that is not running is reported this soon
# Following a job (follow()): the one waiting policy of every host.
FOLLOW_STEP = 0.1  # seconds between looks at the cancel request
SILENT_BEATS = 3  # heartbeats without news of the job after which it is WATCHed again
UPLOAD_MODES = ("auto", "always", "never")
_UPLOAD_ON = ("forbidden", "not-found")  # SUBMIT errors of paths the server cannot read (§6.2)


class Client:
    """A session with a retalk server.

    ``server_key`` (z85 public key of the server) turns CURVE on; ``client_key`` is then this client's
    ``(public, secret)`` pair, whose public half must be in the server's allow-list (§2.2). ``timeout``: seconds
    a request waits for its reply; ``connect_timeout``: seconds ``connect()`` waits (at most ``timeout``).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "retalk-client",
        server_key: bytes | None = None,
        client_key: tuple | None = None,
        timeout: float = 30.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_message: int = 256 * 1024 * 1024,
        context: zmq.Context | None = None,
    ):
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
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
        """HELLO → WELCOME (§4.1); returns the server's capabilities. A server that does not answer within
        ``connect_timeout`` is reported as not running (ProtocolError "timeout")."""
        wait = min(self.timeout, self.connect_timeout)
        try:
            reply = self.request(
                "HELLO", timeout=wait, versions=list(codec.SUPPORTED_VERSIONS), client=self.name
            )
        except ProtocolError as err:
            if err.code != "timeout":
                raise
            raise ProtocolError(
                "timeout",
                f"no answer from {self.endpoint} within {wait:g} s: is `retalk serve` running there, "
                "and is this client's key allowed?",
            ) from None
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
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------------
    def _send(self, frames: list, timeout: float | None = None) -> None:
        # A DEALER blocks while it has no connection (server down, CURVE key refused): wait bounded instead.
        wait = self.timeout if timeout is None else timeout
        if not self._socket.poll(int(wait * 1000), zmq.POLLOUT):
            raise ProtocolError(
                "timeout",
                f"cannot reach {self.endpoint} within {wait:g} s: is `retalk serve` running there, "
                "and is this client's key allowed?",
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
                    f"no reply from {self.endpoint} in time: is `retalk serve` running there, "
                    "and is this client's key allowed?",
                )
            if now - self._last_send >= self._heartbeat:
                self._send(codec.encode("HEARTBEAT"))
            wait = min(deadline - now, self._heartbeat)
            if self._socket.poll(max(1, int(wait * 1000)), zmq.POLLIN):
                frames = self._socket.recv_multipart(copy=False)
                message = codec.decode(frames, sender="server")
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
        """Send a request and return its reply; an ERROR reply (which carries the request's ``req``, §7.1)
        raises ProtocolError with its code at once."""
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
        wait = self.timeout if timeout is None else timeout
        self._send(codec.encode(msg_type, req, payloads, **fields), wait)
        deadline = time.monotonic() + wait
        while True:
            message = self._receive(deadline)
            if message.req != req:
                self._dispatch(message)
                continue
            _raise_error(message)
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
        # Every chunk carries the UPLOAD's req, so every reply of this upload (UPLOAD_ACK, UPLOADED, ERROR)
        # carries it too (§4.2).
        with open(path, "rb") as fh:
            while True:
                while sent < size and (sent - acked) < window * chunk:
                    data = fh.read(chunk)
                    self._send(codec.encode("UPLOAD_CHUNK", ready.req, [data], upload=upload, offset=sent))
                    sent += len(data)
                message = self._receive(deadline)
                if message.req != ready.req:
                    self._dispatch(message)
                    continue
                _raise_error(message)
                if message.type == "UPLOADED":
                    return upload
                if message.type == "UPLOAD_ACK":
                    acked = message["received"]

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

    def submit_or_upload(
        self, clip: str, audio: str, *, upload: str = "auto", on_upload=None, **fields
    ) -> str:
        """SUBMIT (§4.3) of local files: named by path where the server can read them (§6.2), uploaded (§4.2)
        where it cannot. Returns the job id.

        A file that exists here is named by its absolute path; any other name is the server's to resolve
        (relative to its first media root). ``upload``: "auto" uploads both files when the server refuses
        the paths (``forbidden`` or ``not-found``) and both exist here; "always" uploads at once; "never"
        raises the server's refusal. ``on_upload()`` is called before uploading; ``fields`` are submit()'s.
        """
        if upload not in UPLOAD_MODES:
            raise ValueError(f"upload={upload!r}: expected one of {', '.join(UPLOAD_MODES)}")
        if upload != "always":
            try:
                return self.submit(_named(clip), _named(audio), **fields)
            except ProtocolError as err:
                local = os.path.isfile(clip) and os.path.isfile(audio)
                if upload == "never" or err.code not in _UPLOAD_ON or not local:
                    raise
        if on_upload is not None:
            on_upload()
        return self.submit({"upload": self.upload(clip)}, {"upload": self.upload(audio)}, **fields)

    def watch(self, job: str) -> Message:
        """Subscribe to a job's PROGRESS events; returns its current state (§4.5)."""
        return self.request("WATCH", job=job)

    def follow(self, job: str, *, cancel=None, on_progress=None, timeout: float | None = None) -> dict:
        """Follow a job until it ends (§4.4); returns its final PROGRESS fields.

        The one waiting policy of every host: events are awaited in steps of ``FOLLOW_STEP`` seconds; after
        ``SILENT_BEATS`` heartbeats without news of the job it is WATCHed again (a quiet server answers, a
        restarted one re-subscribes this session). ``cancel()`` is asked every step; once it is true, CANCEL
        is sent (once) and the job is followed to its end (``cancelled``, or ``done``/``failed`` when it ended
        first). ``on_progress(fields)`` sees each new state, the final one included. ``timeout``: seconds
        for the whole job (ProtocolError "timeout" past it; default: no limit).
        """
        silence = self._heartbeat * SILENT_BEATS
        current, heard = self.watch(job).fields, time.monotonic()
        deadline = None if timeout is None else heard + timeout
        shown, cancel_sent = None, False
        while True:
            if on_progress is not None and current != shown:
                on_progress(current)
                shown = current
            if current["state"] in codec.FINAL_STATES:
                return current
            if cancel is not None and not cancel_sent and cancel():
                cancel_sent = True
                state = self._cancel_once(job)
                if state in codec.FINAL_STATES:  # a queued job ends at once
                    current = dict(current, state=state)
                    continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ProtocolError("timeout", f"job {job} did not end within {timeout:g} s")
            step = silence - (now - heard)
            if cancel is not None and not cancel_sent:
                step = min(step, FOLLOW_STEP)
            if deadline is not None:
                step = min(step, deadline - now)
            event = self.next_event(timeout=max(0.0, step))
            if event is not None and event["job"] == job:
                current, heard = event.fields, time.monotonic()
            elif time.monotonic() - heard >= silence:
                current, heard = self.watch(job).fields, time.monotonic()

    def _cancel_once(self, job: str) -> str | None:
        """CANCEL for follow(): the job's state after it, or None when it had just ended (its end follows)."""
        try:
            return self.cancel(job)
        except ProtocolError as err:
            if err.code != "invalid":
                raise
            return None

    def status(self) -> dict:
        return dict(self.request("STATUS").fields)

    def list_jobs(self, states: list | None = None, limit: int = 100, job: str | None = None) -> list:
        """LIST (§4.5): the newest jobs first, at most ``limit``, only ``states`` or only ``job`` if given."""
        fields: dict = {"limit": limit}
        if states:
            fields["states"] = list(states)
        if job is not None:
            fields["job"] = job
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
                if message.type in ("ERROR", "END"):
                    ended = True
                    _raise_error(message)
                    return
                yield message
                consumed += 1
                # CREDIT and ABORT carry the stream's req: so do their errors (§4.8)
                if consumed * 2 >= window:
                    self._send(codec.encode("CREDIT", reply.req, stream=stream, credit=consumed))
                    consumed = 0
        finally:
            if not ended and not self._socket.closed:
                self._send(codec.encode("ABORT", reply.req, stream=stream))
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


def _named(path: str) -> str:
    """A file that exists here by its absolute path; any other name as given, for the server to resolve."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _raise_error(message: Message) -> None:
    """An ERROR reply as the ProtocolError it reports (§7); any other message passes."""
    if message.type == "ERROR":
        extra = {k: v for k, v in message.fields.items() if k not in ("code", "message", "retryable")}
        raise ProtocolError(message["code"], message["message"], message["retryable"], message.req, **extra)


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

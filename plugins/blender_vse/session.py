"""One re-dub conversation with a retalk server, run on a background thread so Blender never waits on the network.

No bpy here: the operator reads everything it needs from Blender first (a Submission), then polls a
RedubSession from its timer. All socket work stays on the session's own thread (ZeroMQ sockets are not
thread-safe); submitting, uploading and following the job are the protocol client's (retalk_protocol.client).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from fractions import Fraction


@dataclass
class ServerSettings:
    endpoint: str
    timeout: float = 10.0
    server_key_file: str = ""  # the server's public *.key: turns CURVE on
    client_key_file: str = ""  # this client's *.key_secret, listed on the server


@dataclass
class Submission:
    """What the add-on asks the server for: the strip's frames, the new audio and the job options."""

    video: str
    audio: str
    start: int
    end: int
    rate: Fraction | None
    audio_offset: Fraction
    engine: str
    options: dict
    output_stem: str  # the result goes to output_stem + the codec's extension


class RedubSession:
    """Submit, follow and fetch one job; ``poll()`` from the UI thread, ``cancel()`` from anywhere."""

    def __init__(self, server: ServerSettings, submission: Submission, client_name: str = "blender-vse"):
        self.server = server
        self.submission = submission
        self.client_name = client_name
        self.state = "connecting"  # connecting, uploading, queued, running, fetching, done, failed, cancelled
        self.stage = ""
        self.done = 0
        self.total = 0
        self.eta: float | None = None
        self.job: str | None = None
        self.media_sent: str | None = None  # "path" (the server reads it in place) or "upload"
        self.output: str | None = None
        self.result: dict = {}
        self.error: str | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retalk-redub", daemon=True)

    # -- UI thread -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def status_line(self) -> str:
        with self._lock:
            if self._cancel.is_set() and not self.finished:
                return "retalk: cancelling…"
            if self.state == "running" and self.total:
                line = f"retalk: {self.stage} {self.done}/{self.total}"
                if self.eta is not None:
                    line += f", {self.eta:.0f} s left"
                return line + " (Esc cancels)"
            return f"retalk: {self.state}{'' if self.finished else '… (Esc cancels)'}"

    # -- session thread --------------------------------------------------------------------------------------
    def _set(self, **fields) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)

    def _run(self) -> None:
        try:
            from retalk_protocol.codec import ProtocolError
        except ImportError as err:  # the extension's bundled wheels are missing
            self._set(
                state="failed",
                error=f"the retalk protocol client is not installed ({err}); reinstall the extension",
            )
            return
        try:
            self._converse()
        except ProtocolError as err:
            self._set(state="failed", error=f"server {self.server.endpoint}: {err.code}: {err.message}")
        except Exception as err:  # anything else: the UI still shows one line, never a traceback
            self._set(state="failed", error=f"{type(err).__name__}: {err}")

    def _converse(self) -> None:
        from retalk_protocol.client import Client

        server_key, client_key = _load_keys(self.server)
        client = Client(
            self.server.endpoint,
            name=self.client_name,
            server_key=server_key,
            client_key=client_key,
            timeout=self.server.timeout,
            connect_timeout=self.server.timeout,  # a server the add-on just started may take a while to bind
        )
        try:
            client.connect()
            submission = self.submission
            job = client.submit_or_upload(
                submission.video,
                submission.audio,
                on_upload=lambda: self._set(state="uploading", media_sent="upload"),
                start=submission.start,
                end=submission.end,
                rate=submission.rate,
                audio_offset=submission.audio_offset,
                engine=submission.engine,
                options=submission.options,
            )
            self._set(job=job, state="queued", media_sent=self.media_sent or "path")
            final = client.follow(job, cancel=self._cancel.is_set, on_progress=self._show)
            if final["state"] != "done":
                error = final.get("error") or {}
                message = error.get("message") or f"the job ended {final['state']}"
                self._set(state="cancelled" if final["state"] == "cancelled" else "failed", error=message)
                return
            self._set(state="fetching", result=dict(final.get("result") or {}))
            partial = submission.output_stem + ".fetching"
            info = client.fetch(job, partial)
            output = submission.output_stem + info["extension"]
            os.replace(partial, output)
            self._set(output=output, state="done")
        finally:
            client.close()

    def _show(self, event: dict) -> None:
        state = event["state"] if event["state"] in ("queued", "running") else self.state
        self._set(
            state=state,
            stage=event.get("stage") or "",
            done=int(event.get("done") or 0),
            total=int(event.get("total") or 0),
            eta=event.get("eta"),
        )


def _load_keys(server: ServerSettings):
    """CURVE keys from `retalk keys` files, or (None, None) for a plain connection."""
    if not server.server_key_file:
        return None, None
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(os.path.expanduser(server.server_key_file))
    if not server.client_key_file:
        raise ValueError("a server key is set but no client key: set both in the add-on's preferences")
    client_key = zmq.auth.load_certificate(os.path.expanduser(server.client_key_file))
    if client_key[1] is None:
        raise ValueError(f"{server.client_key_file} holds no secret key: choose the *.key_secret file")
    return server_public, client_key

"""Result streams (PROTOCOL.md §4.6, §4.7, §5): a pump thread per stream, gated by the client's credit.

A pump prepares at most one message ahead of its credit and hands messages to the event loop over an inproc
PUSH socket (ZeroMQ sockets belong to one thread); the loop forwards the payload frames without copying.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import zmq
from retalk_protocol import codec
from retalk_protocol.codec import ProtocolError

from retalk import media
from retalk.errors import RetalkError

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
        except ProtocolError as err:
            sock.send_multipart([key, b"error", err.code.encode(), err.message.encode()])
        except RetalkError as err:
            sock.send_multipart([key, b"error", b"media", str(err).encode()])
        except Exception as err:
            sock.send_multipart([key, b"error", b"internal", f"{type(err).__name__}: {err}".encode()])
        finally:
            close = getattr(self._messages, "close", None)
            if close is not None:
                close()
            sock.close()

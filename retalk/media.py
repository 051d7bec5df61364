"""Exact media I/O on PyAV: frame-accurate ranges, rational frame rates, colour tags, atomic writes.

Frame ``i`` of a clip is the ``i``-th frame in presentation order, found by its timestamp in an index of the
video stream's packets (built once per file and cached), so ranges are exact for variable-frame-rate clips,
B-frames and sparse keyframes alike. Frame rates and times are ``Fraction``s end to end.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
import os
import queue
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from retalk.errors import InputError, MediaError

# ffmpeg's own names (av_color_*_name) for the AVCOL_* codes; codes not listed read as None ("unspecified").
_RANGE_NAMES = {1: "tv", 2: "pc"}
_PRIMARIES_NAMES = {
    1: "bt709",
    4: "bt470m",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "film",
    9: "bt2020",
    10: "smpte428",
    11: "smpte431",
    12: "smpte432",
    22: "ebu3213",
}
_TRANSFER_NAMES = {
    1: "bt709",
    4: "gamma22",
    5: "gamma28",
    6: "smpte170m",
    7: "smpte240m",
    8: "linear",
    9: "log100",
    10: "log316",
    11: "iec61966-2-4",
    12: "bt1361e",
    13: "iec61966-2-1",
    14: "bt2020-10",
    15: "bt2020-12",
    16: "smpte2084",
    17: "smpte428",
    18: "arib-std-b67",
}
_MATRIX_NAMES = {
    0: "gbr",
    1: "bt709",
    4: "fcc",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020nc",
    10: "bt2020c",
    11: "smpte2085",
    14: "ictcp",
}
# Matrix name -> swscale's SWS_CS_* code for the RGB -> YUV conversion; anything else converts as BT.601,
# which is also what swscale assumes for untagged YUV when decoding.
_SWS_MATRIX = {
    "bt709": 1,
    "fcc": 4,
    "bt470bg": 5,
    "smpte170m": 5,
    "smpte240m": 7,
    "bt2020nc": 9,
    "bt2020c": 9,
}
_SWS_BT601 = 5
_UNSPECIFIED = 2  # AVCOL_PRI/TRC/SPC_UNSPECIFIED


@dataclass(frozen=True)
class ColorInfo:
    """Colour tags of a video stream, by ffmpeg's names; None where the source leaves a tag unspecified."""

    range: str | None = None  # "tv" (limited) or "pc" (full)
    primaries: str | None = None  # e.g. "bt709", "bt2020"
    transfer: str | None = None  # e.g. "bt709", "smpte2084", "arib-std-b67"
    matrix: str | None = None  # e.g. "bt709", "smpte170m", "bt2020nc"


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    rate: Fraction  # exact average frame rate (frames per second)
    time_base: Fraction  # of the video stream's timestamps
    frame_count: int  # exact: counted from the stream's packets
    duration: Fraction  # frame_count / rate, in seconds
    pix_fmt: str
    bit_depth: int
    color: ColorInfo
    has_audio: bool
    audio_rate: int | None
    audio_channels: int | None


@dataclass
class FrameChunk:
    start: int  # index in the clip of frames[0]
    frames: np.ndarray  # (n, H, W, 3) RGB, C-contiguous; uint8, or uint16 for high_bit_depth
    # Presentation time of each frame in seconds, from the file's timestamps, relative to the clip's first
    # frame: exactly index / rate for constant-rate MP4/MOV; Matroska stores milliseconds.
    times: list[Fraction]


@dataclass(frozen=True)
class CodecSpec:
    encoder: str
    pix_fmt: str
    suffixes: tuple[str, ...]  # output suffixes whose container holds the codec; the first is its default
    options: dict[str, str]
    audio_encoder: str
    audio_options: dict[str, str]
    limited_range: bool = False  # the format only stores limited ("tv") range, whatever the source's
    fast_options: dict[str, str] | None = None  # what VideoWriter(fast=True) adds: the same format, sooner


# Output suffix -> FFmpeg muxer: the suffix picks the container.
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}

CODECS: dict[str, CodecSpec] = {
    # fast: x264's veryfast preset at the same quality target (crf), about twice as fast as its default at 720p
    "h264": CodecSpec(
        "libx264",
        "yuv420p",
        (".mp4", ".mov", ".mkv"),
        {"crf": "18"},
        "aac",
        {"b": "192k"},
        fast_options={"preset": "veryfast"},
    ),
    # prores_ks profile 3 = HQ, 4 = 4444; vendor apl0 so Apple/NLE decoders accept the files as their own.
    # MP4 has no ProRes mapping (FFmpeg refuses it).
    "prores": CodecSpec(
        "prores_ks",
        "yuv422p10le",
        (".mov", ".mkv"),
        {"profile": "3", "vendor": "apl0"},
        "pcm_s24le",
        {},
        limited_range=True,
    ),
    "prores4444": CodecSpec(
        "prores_ks",
        "yuv444p10le",
        (".mov", ".mkv"),
        {"profile": "4", "vendor": "apl0"},
        "pcm_s24le",
        {},
        limited_range=True,
    ),
    # FFV1 in RGB (bgr0 is its only 8-bit RGB format): 8-bit RGB in, the same bits out. QuickTime refuses FFV1
    # and MP4 has no mapping for it that other tools read: Matroska only.
    "lossless": CodecSpec("ffv1", "bgr0", (".mkv",), {"level": "3"}, "pcm_s24le", {}),
}


def default_extension(codec: str) -> str:
    """The file extension (with the dot) a `codec` is written with by default."""
    return _codec_spec(codec).suffixes[0]


def container_for(path: str | os.PathLike, codec: str) -> str:
    """The FFmpeg muxer the suffix of `path` picks, refusing a suffix retalk does not write or whose container
    cannot hold `codec` (InputError, one line naming the suffixes that work)."""
    path, spec = Path(path), _codec_spec(codec)
    suffix = path.suffix.lower()
    allowed = ", ".join(spec.suffixes)
    if suffix not in CONTAINERS:
        raise InputError(
            f"{path}: retalk writes {', '.join(CONTAINERS)} files; name the output with one of those suffixes "
            f"({codec} goes in {allowed})"
        )
    if suffix not in spec.suffixes:
        raise InputError(
            f"{path}: a {suffix} file cannot hold {codec} video; use {allowed} "
            f"(e.g. {path.with_suffix(spec.suffixes[0]).name}) or another --codec"
        )
    return CONTAINERS[suffix]


def check_output(path: str | os.PathLike, codec: str) -> None:
    """Everything about an output file that can fail, checked before any work: a file name (not a folder) with
    a suffix whose container holds `codec`, in an existing folder this process can write in."""
    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"{path}: is a folder; name the output file, e.g. {path / 'redub'}{default_extension(codec)}"
        )
    container_for(path, codec)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist; create it first")
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise InputError(
            f"{path}: cannot write in {folder} ({err.strerror}); choose a writable folder"
        ) from None


def frame_time(index: int, rate: Fraction) -> Fraction:
    """Nominal time in seconds of frame `index` at a constant `rate`."""
    return Fraction(index) / Fraction(rate)


# ---------------------------------------------------------------------------------------------------------
# Opening and indexing


@contextlib.contextmanager
def _open_input(path: Path) -> Iterator[av.container.InputContainer]:
    _check_exists(path)
    try:
        container = av.open(str(path), "r")
    except av.error.FFmpegError as err:
        raise MediaError(f"{path}: not a readable media file ({_reason(err)}); check it is complete") from err
    try:
        yield container
    except av.error.FFmpegError as err:
        raise MediaError(
            f"{path}: decoding failed ({_reason(err)}); the file may be truncated or corrupt"
        ) from err
    finally:
        container.close()


def _reason(err: av.error.FFmpegError) -> str:
    return err.strerror or type(err).__name__


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # cover art is not a video
            return stream
    raise MediaError(f"{path}: has no video stream; pass a video file (.mp4, .mov, .mkv, ...)")


@dataclass(frozen=True)
class _StreamIndex:
    pts: np.ndarray  # presentation timestamps of all frames, sorted: frame i has pts[i]
    keyframe_pts: np.ndarray  # sorted

    def position(self, pts: int) -> int:
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else -1

    def seek_points(self, start: int) -> list[int | None]:
        """Keyframes to try for frame `start`, latest first; None = decode from the beginning."""
        before = self.keyframe_pts[self.keyframe_pts <= self.pts[start]]
        return [int(p) for p in before[::-1][:2]] + [None]


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise MediaError(f"{path}: no such file; check the path")


def _index(path: Path) -> _StreamIndex:
    _check_exists(path)
    stat = path.stat()
    return _cached_index(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _cached_index(path: str, size: int, mtime_ns: int) -> _StreamIndex:
    # size and mtime are part of the key so a rewritten file is indexed again
    pts, keyframes, packets = [], [], 0
    with _open_input(Path(path)) as container:
        stream = _video_stream(container, Path(path))
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            packets += 1
            if packet.is_discard:  # dropped by an edit list: not a frame of the clip
                continue
            if packet.pts is None:
                raise MediaError(
                    f"{path}: video packets carry no timestamps; remux the file into .mp4 or .mkv"
                )
            pts.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
        if packets < stream.frames:  # the container's index lists frames whose data is missing
            raise MediaError(
                f"{path}: only {packets} of the {stream.frames} frames the file lists are present; "
                "the file is truncated, copy or export it again"
            )
    pts_array = np.sort(np.asarray(pts, dtype=np.int64))
    if len(pts_array) == 0:
        raise MediaError(f"{path}: the video stream has no frames; re-export the clip")
    if np.any(np.diff(pts_array) == 0):
        raise MediaError(
            f"{path}: duplicate frame timestamps in the video stream; remux or re-encode the clip"
        )
    return _StreamIndex(pts_array, np.sort(np.asarray(keyframes, dtype=np.int64)))


def _color_info(codec_context: av.video.codeccontext.VideoCodecContext) -> ColorInfo:
    return ColorInfo(
        range=_RANGE_NAMES.get(codec_context.color_range),
        primaries=_PRIMARIES_NAMES.get(codec_context.color_primaries),
        transfer=_TRANSFER_NAMES.get(codec_context.color_trc),
        matrix=_MATRIX_NAMES.get(codec_context.colorspace),
    )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, exact rate and frame count, pixel format, colour tags and audio presence of a video file."""
    path = Path(path)
    index = _index(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        codec_context = stream.codec_context
        frame_count = len(index.pts)
        time_base = Fraction(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:  # no rate in the container: frames over the span of their timestamps
            span = int(index.pts[-1] - index.pts[0])
            if frame_count < 2 or span <= 0:
                raise MediaError(f"{path}: the frame rate is unknown; remux the clip with a frame rate")
            rate = Fraction(frame_count - 1) / (span * time_base)
        rate = Fraction(rate)
        pix_fmt = codec_context.pix_fmt or stream.format.name
        bit_depth = av.video.format.VideoFormat(pix_fmt).components[0].bits
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=path,
            width=codec_context.width,
            height=codec_context.height,
            rate=rate,
            time_base=time_base,
            frame_count=frame_count,
            duration=frame_count / rate,
            pix_fmt=pix_fmt,
            bit_depth=bit_depth,
            color=_color_info(codec_context),
            has_audio=audio is not None,
            audio_rate=audio.codec_context.sample_rate if audio is not None else None,
            audio_channels=audio.codec_context.channels if audio is not None else None,
        )


# ---------------------------------------------------------------------------------------------------------
# Decoding video


def _decoded_frames(path: Path, index: _StreamIndex, start: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(clip index, frame) from frame `start` on: seek to a keyframe before it, decode forward, count by pts."""
    target = int(index.pts[start])
    for seek_pts in index.seek_points(start):
        with _open_input(path) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            if seek_pts is not None:
                container.seek(seek_pts, stream=stream, backward=True)
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None or first.pts is None or (first.pts > target and seek_pts is not None):
                continue  # the demuxer landed after the target: try an earlier keyframe
            expected = start
            for frame in itertools.chain([first], frames):
                if frame.pts is None:
                    raise MediaError(f"{path}: decoded frames carry no timestamps; remux the file into .mp4")
                if frame.pts < target:
                    continue
                position = index.position(frame.pts)
                if position != expected:
                    raise MediaError(
                        f"{path}: frame {expected} could not be decoded; the file may be corrupt"
                    )
                yield position, frame
                expected += 1
            if expected < len(index.pts):
                raise MediaError(
                    f"{path}: decoding stopped at frame {expected} of {len(index.pts)}; the file may be truncated"
                )
            return
    raise MediaError(f"{path}: cannot decode from frame {start}; the file may be corrupt")


def _check_range(path: Path, start: int, end: int | None, frame_count: int) -> int:
    end = frame_count if end is None else end
    if not 0 <= start <= end <= frame_count:
        raise InputError(
            f"{path}: frame range [{start}, {end}) is outside the clip's {frame_count} frames; "
            f"use 0 <= start <= end <= {frame_count}"
        )
    return end


class _ChunkBuffers:
    """The chunk buffers of one :func:`iter_frames`, each used again once nothing refers to it or to a view of
    it (the consumer has moved on): a fresh chunk of 16 720p frames is 44 MB, more than malloc recycles, and
    the kernel's filling of its new pages costs more CPU than decoding the frames into them."""

    KEEP = 4  # the decoding thread's chunk, one queued, the consumer's, and one spare

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []
        # the count of an array that only a list refers to, taken the way take() takes it (interpreters differ
        # in the references of their own that they count)
        self._alone = next(map(sys.getrefcount, [np.empty(0)]))

    def take(self, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        counts = list(map(sys.getrefcount, self._buffers))
        for buffer, count in zip(self._buffers, counts, strict=True):
            if count == self._alone and buffer.shape == shape and buffer.dtype == dtype:
                return buffer
        buffer = np.empty(shape, dtype)
        if len(self._buffers) < self.KEEP:
            self._buffers.append(buffer)
        return buffer


def iter_frames(
    path: str | os.PathLike,
    start: int = 0,
    end: int | None = None,
    *,
    chunk_size: int = 16,
    high_bit_depth: bool = False,
) -> Iterator[FrameChunk]:
    """Frames [start, end) (end exclusive, None = to the end) as RGB chunks of at most `chunk_size` frames.

    Memory is bounded by `chunk_size`, not by the clip. Colour conversion follows the stream's matrix and
    range tags (untagged YUV converts as BT.601 limited range, as FFmpeg does). uint8 RGB, or uint16 RGB
    (rgb48, full 16-bit scale) with `high_bit_depth`.
    """
    path = Path(path)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    index = _index(path)
    end = _check_range(path, start, end, len(index.pts))
    if start == end:
        return
    pixel_format, dtype = ("rgb48le", np.uint16) if high_bit_depth else ("rgb24", np.uint8)
    buffers = _ChunkBuffers()
    with contextlib.closing(_decoded_frames(path, index, start)) as decoded:
        buffer, times, chunk_start = None, [], start
        for position, frame in decoded:
            rgb = frame.to_ndarray(format=pixel_format)
            if buffer is None:
                buffer = buffers.take((min(chunk_size, end - position), *rgb.shape), dtype)
            elif rgb.shape != buffer.shape[1:]:
                raise MediaError(f"{path}: the frame size changes at frame {position}; re-encode the clip")
            buffer[len(times)] = rgb  # copies into a C-contiguous block whatever the frame's line padding
            times.append((frame.pts - int(index.pts[0])) * Fraction(frame.time_base))
            if len(times) == len(buffer):
                yield FrameChunk(chunk_start, buffer, times)
                buffer, times, chunk_start = None, [], position + 1
            if position + 1 == end:
                return


def hash_packets(path: str | os.PathLike, start: int, end: int, sha, *, every: int = 16) -> Iterator[int]:
    """Feed ``sha`` (a hashlib object) what frames [start, end) of ``path`` decode from, without decoding them:
    the decoder (PyAV's version), the video stream's decoding parameters (codec, its extradata, size, pixel
    format, colour tags, which the RGB conversion follows) and, in decoding order, the packets (bytes, and the
    frame each shows counted from frame ``start``) from the keyframe that decoding frame ``start`` begins at until
    every frame of the range has its packet (a reference always comes before the frames that use it, so a
    B-frame's later reference is in). Other pixels give other packets, so another digest; the same stream
    remuxed keeps its digest. Yields how many of the range's frames are hashed, every ``every`` and at the end.
    """
    path = Path(path)
    index = _index(path)
    end = _check_range(path, start, end, len(index.pts))
    if start == end:
        return
    keyframe = index.seek_points(start)[0]
    # seek to that keyframe; where the demuxer cannot land on it, read from the beginning
    for seek in (keyframe, None) if keyframe is not None else (None,):
        with _open_input(path) as container:
            stream = _video_stream(container, path)
            packets = _packets_from(container, stream, keyframe, seek)
            opening = next(packets, None)
            if opening is None:
                continue
            context = stream.codec_context
            parameters = (av.__version__, context.name, context.width, context.height, context.pix_fmt)
            parameters += (
                context.color_range,
                context.colorspace,
                context.color_primaries,
                context.color_trc,
            )
            sha.update(repr(parameters).encode())
            sha.update(context.extradata or b"")
            done = 0
            for packet in itertools.chain([opening], packets):
                # the frame it shows, counted from frame start (None: none, as an edit list's discarded frames)
                position = -1 if packet.is_discard or packet.pts is None else index.position(packet.pts)
                shown = position - start if position >= 0 else None
                sha.update(f"{shown},{packet.size}".encode())
                sha.update(memoryview(packet))
                if shown is not None and 0 <= shown < end - start:
                    done += 1
                    if done == end - start:
                        yield done
                        return
                    if done % every == 0:
                        yield done
            break
    raise MediaError(
        f"{path}: frames {start}-{end - 1} have no packets in the stream; the file may be corrupt"
    )


def _packets_from(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    keyframe: int | None,
    seek: int | None,
) -> Iterator[av.Packet]:
    """The stream's packets in decoding order from the keyframe packet with timestamp ``keyframe`` (None: the
    first packet), after seeking to ``seek`` (None: from the beginning)."""
    if seek is not None:
        container.seek(seek, stream=stream, backward=True)
    started = keyframe is None
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's flush packet
            continue
        started = started or (packet.pts == keyframe and packet.is_keyframe)
        if started:
            yield packet


_AHEAD_END = object()


class Ahead:
    """The items of ``produce``, made on a thread (started now) up to ``depth`` items ahead of whoever iterates
    this. What the thread raises is raised to the iterating thread; ``close`` (also when iterating stops early:
    failed or cancelled) stops the thread after the item it is making, and returns once it has ended."""

    def __init__(self, produce: Iterable, depth: int = 1, name: str = "retalk-decode") -> None:
        self._items: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Iterable) -> None:
        try:
            for item in produce:
                self._items.put((item, None))
                if self._stop.is_set():
                    return
            self._items.put((_AHEAD_END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self._items.put((_AHEAD_END, err))

    def __iter__(self) -> Iterator:
        try:
            while True:
                item, err = self._items.get()
                if item is _AHEAD_END:
                    if err is not None:
                        raise err
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while True:  # room for the thread's last put: it then sees the stop and ends
            try:
                self._items.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


def read_frames(path: str | os.PathLike, start: int, end: int) -> np.ndarray:
    """Frames [start, end) as one (n, H, W, 3) uint8 RGB array; for small ranges (memory grows with n)."""
    chunks = [chunk.frames for chunk in iter_frames(path, start, end, chunk_size=max(1, end - start))]
    if not chunks:
        info = probe(path)
        return np.empty((0, info.height, info.width, 3), dtype=np.uint8)
    return chunks[0]


# ---------------------------------------------------------------------------------------------------------
# Decoding audio

# Extra source samples decoded on each side of a requested range, so the resampler sees the same
# neighbourhood as when resampling the whole file (resampy kaiser_best spans < 200 source samples at 44.1k).
_RESAMPLE_MARGIN_SECONDS = Fraction(1, 10)


def read_audio(
    path: str | os.PathLike,
    *,
    start: Fraction = Fraction(0),
    duration: Fraction | None = None,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Mono float32 samples at `sample_rate` from any file with an audio stream, cut sample-exactly.

    The first sample is ``round(start * sample_rate)`` of the whole file resampled (as librosa.load does:
    channels averaged, resampy kaiser_best: :func:`resample_kaiser_best`), and at most
    ``round(duration * sample_rate)`` samples follow.
    A file that ends early gives fewer samples (none if `start` is past the end): padding or refusing a short
    audio is the caller's policy. Only the requested range (plus a resampler margin) is kept in memory.
    """
    return read_audio_rates(path, (sample_rate,), start=start, duration=duration)[0]


def read_audio_rates(
    path: str | os.PathLike,
    sample_rates: Sequence[int],
    *,
    start: Fraction = Fraction(0),
    duration: Fraction | None = None,
) -> list[np.ndarray]:
    """:func:`read_audio` at each of ``sample_rates`` from one decode of the file (each the same samples as
    ``read_audio`` at that rate)."""
    path = Path(path)
    start = Fraction(start)
    if start < 0 or (duration is not None and Fraction(duration) < 0):
        raise InputError(f"{path}: audio start ({start} s) and duration ({duration} s) must not be negative")
    with _open_input(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio stream; pass a file with sound (.wav, .mp3, .mp4, ...)")
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate
        length = None
        if "mov" in container.format.name and stream.duration:
            # MP4/MOV end AAC mid-frame through the edit list; the decoder still emits the whole last frame
            length = round(stream.duration * Fraction(stream.time_base) * source_rate)
        windows = [_resample_window(source_rate, rate, start, duration, length) for rate in sample_rates]
        first = min(window[0] for window in windows)
        ends = [window[1] for window in windows]
        source = _decode_mono(container, stream, first, None if None in ends else max(ends))
    if not np.all(np.isfinite(source)):
        raise InputError(
            f"{path}: the audio contains NaN or infinite samples; re-export it as PCM or float WAV"
        )
    return [
        _resample(source[a - first : None if b is None else b - first], source_rate, rate, a, start, duration)
        for rate, (a, b) in zip(sample_rates, windows, strict=True)
    ]


def _resample_window(
    source_rate: int, sample_rate: int, start: Fraction, duration: Fraction | None, length: int | None
) -> tuple[int, int | None]:
    """Source samples [a, b) (b None: to the end) whose resampling gives the requested range exactly: a window
    that starts on the grid shared by both rates, so its samples are the whole file's samples (``period``
    source samples map to exactly ``period * ratio`` output samples), with a resampler margin each side."""
    first = round(start * sample_rate)
    count = None if duration is None else round(Fraction(duration) * sample_rate)
    period = source_rate // math.gcd(source_rate, sample_rate)
    ratio = Fraction(sample_rate, source_rate)
    margin = math.ceil(_RESAMPLE_MARGIN_SECONDS * source_rate / period) * period
    window_start = max(0, (math.floor(first / ratio) // period) * period - margin)
    window_end = None if count is None else math.ceil((first + count) / ratio) + margin
    if length is not None:
        window_end = length if window_end is None else min(window_end, length)
    return window_start, window_end


def _resample(
    source: np.ndarray,
    source_rate: int,
    sample_rate: int,
    window_start: int,
    start: Fraction,
    duration: Fraction | None,
) -> np.ndarray:
    """The requested range at ``sample_rate`` from the source window that starts at ``window_start``."""
    ratio = Fraction(sample_rate, source_rate)
    if math.floor(len(source) * ratio) < 1:  # nothing (or less than one output sample) left from `start` on
        return np.zeros(0, dtype=np.float32)
    resampled = resample_kaiser_best(source, source_rate, sample_rate)
    offset = round(start * sample_rate) - int(window_start * ratio)
    stop = None if duration is None else offset + round(Fraction(duration) * sample_rate)
    return np.ascontiguousarray(resampled[offset:stop], dtype=np.float32)


@functools.cache
def _kaiser_best_filter() -> tuple[np.ndarray, int]:
    """resampy's kaiser_best filter: the right wing of the windowed sinc and its samples per zero crossing
    (read from its package data without importing resampy, which brings numba)."""
    spec = importlib.util.find_spec("resampy")
    if spec is None or not spec.submodule_search_locations:
        raise MediaError(
            "resampy is not installed: pip install resampy (its kaiser_best filter resamples audio)"
        )
    with np.load(Path(spec.submodule_search_locations[0]) / "data" / "kaiser_best.npz") as data:
        return data["half_window"], int(data["precision"])


RESAMPLE_BLOCK = 1 << 16  # output samples computed at once: temporaries stay a few MB for any length


def resample_kaiser_best(x: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """``librosa.resample(x, orig_sr=source_rate, target_sr=rate, res_type="kaiser_best")`` bit for bit:
    resampy's band-limited interpolation, each output sample the same float64 sum over the filter's taps in the
    same order, vectorised over the output samples in numpy. (resampy runs it through numba, which compiles it
    in every new process: seconds before the first sample, more than a short line takes here.)"""
    if source_rate == rate:
        return x
    half_window, precision = _kaiser_best_filter()
    ratio = float(rate) / source_rate
    count = int(len(x) * float(rate) / float(source_rate))
    window = ratio * half_window if ratio < 1 else half_window  # downsampling: the filter's cut-off drops
    delta = np.diff(window, append=window[-1])
    scale = min(1.0, ratio)
    step = int(scale * precision)
    source = x.astype(np.float64)
    times = np.arange(count) * (1.0 / ratio)
    out = np.zeros(count, x.dtype)
    for a in range(0, count, RESAMPLE_BLOCK):
        t = times[a : a + RESAMPLE_BLOCK]
        at = t.astype(np.int64)  # the input sample at or before each output time
        acc = out[a : a + RESAMPLE_BLOCK]
        frac = scale * (t - at)
        # the left wing runs back from sample `at`, then the right wing forward from `at + 1`
        for wing_frac, taps_max, direction, first in (
            (frac, at + 1, -1, at),
            (scale - frac, len(x) - at - 1, 1, at + 1),
        ):
            index = wing_frac * precision
            offset = index.astype(np.int64)
            eta = index - offset
            taps = np.minimum(taps_max, (len(window) - offset) // step)
            for i in range(int(taps.max(initial=0))):
                tap = np.minimum(offset + i * step, len(window) - 1)
                term = (window[tap] + eta * delta[tap]) * source[
                    np.clip(first + direction * i, 0, len(x) - 1)
                ]
                if i >= taps.min():
                    # past this sample's wing (adding 0 leaves the float32 sum as it is)
                    term[i >= taps] = 0.0
                # a float64 sum, stored as float32, as resampy does
                np.add(acc, term, out=acc, casting="unsafe")
    # librosa's fix_length: ceil(len * ratio) samples, zero-padded at the end
    length = int(np.ceil(len(x) * ratio))
    return np.concatenate([out[:length], np.zeros(max(length - count, 0), x.dtype)])


def _decode_mono(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, first: int, end: int | None
) -> np.ndarray:
    """Source samples [first, end) of the whole decode, channels averaged, float32 (int PCM scaled to [-1, 1))."""
    to_float = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=None)
    pieces, position = [], 0
    for frame in container.decode(stream):
        for converted in to_float.resample(frame):
            samples = converted.to_ndarray()  # (channels, n) float32
            n = samples.shape[1]
            lo, hi = max(first - position, 0), n if end is None else min(end - position, n)
            if lo < hi:
                pieces.append(samples[:, lo:hi].mean(axis=0, dtype=np.float32))
            position += n
        if end is not None and position >= end:
            break
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Encoding


def _codec_spec(codec: str) -> CodecSpec:
    if codec not in CODECS:
        raise InputError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return CODECS[codec]


def _color_code(table: dict[int, str], name: str | None, what: str) -> int | None:
    if name is None:
        return None
    for code, known in table.items():
        if known == name.lower():
            return code
    raise InputError(f"unknown colour {what} {name!r}; use one of {', '.join(table.values())} or None")


class VideoWriter:
    """Encode RGB frames (and optionally a mono/multi-channel float audio track) into a new file; ``fast``
    trades file size for encoding speed where the codec allows (CodecSpec.fast_options), never the format.

    Writes go to a hidden temp file in the destination folder that `close` renames onto `path`; `abort`
    (or leaving a ``with`` block by an exception) deletes it, so `path` is never half-written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        width: int,
        height: int,
        rate: Fraction,
        codec: str = "h264",
        color: ColorInfo | None = None,
        audio: np.ndarray | None = None,
        audio_rate: int = 16000,
        fast: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fast = fast
        self.spec = spec = _codec_spec(codec)
        if isinstance(rate, float) or not rate or Fraction(rate) <= 0:
            raise InputError(
                f"frame rate {rate!r}: pass a positive Fraction (or int), e.g. Fraction(1350, 61)"
            )
        self.rate = Fraction(rate)
        self.width, self.height = int(width), int(height)
        encoded = av.video.format.VideoFormat(spec.pix_fmt)
        if self.width <= 0 or self.height <= 0:
            raise InputError(f"frame size {width}x{height}: width and height must be positive")
        if (encoded.chroma_width(2) < 2 and self.width % 2) or (
            encoded.chroma_height(2) < 2 and self.height % 2
        ):
            raise InputError(
                f"frame size {width}x{height} is odd but codec {codec!r} subsamples colour; "
                "crop to an even size or use codec 'lossless' or 'prores4444'"
            )
        self._audio = _check_audio(audio) if audio is not None else None
        full_range = color is not None and _color_code(_RANGE_NAMES, color.range, "range") == 2
        self._range = 2 if full_range and not spec.limited_range else 1  # for YUV formats only
        self._matrix = _SWS_MATRIX.get((color.matrix or "") if color else "", _SWS_BT601)
        container = container_for(self.path, codec)
        if not self.path.parent.is_dir():
            raise MediaError(f"{self.path}: folder {self.path.parent} does not exist; create it first")
        # a hidden, unique name beside the target: same file system, so the final rename is atomic
        self._temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.part")
        self._frames_written = 0
        self._audio_written = 0
        try:
            self._container = av.open(str(self._temp), "w", format=container)
            self._video = self._add_video_stream(color)
            self._audio_stream = self._add_audio_stream(audio_rate) if self._audio is not None else None
        except (av.error.FFmpegError, ValueError, OSError) as err:
            self.abort()
            raise MediaError(f"{self.path}: cannot set up the {codec} encoder ({err})") from err

    def _add_video_stream(self, color: ColorInfo | None) -> av.video.stream.VideoStream:
        options = dict(self.spec.options)
        if self.fast and self.spec.fast_options:
            options.update(self.spec.fast_options)
        stream = self._container.add_stream(self.spec.encoder, rate=self.rate, options=options)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.spec.pix_fmt
        # one tick per frame: every timestamp and the frame rate stay exact (1350/61 fps -> 61/1350 s ticks)
        stream.time_base = stream.codec_context.time_base = 1 / self.rate
        stream.thread_type = "AUTO"
        if color is not None:
            context = stream.codec_context
            context.color_primaries = (
                _color_code(_PRIMARIES_NAMES, color.primaries, "primaries") or _UNSPECIFIED
            )
            context.color_trc = _color_code(_TRANSFER_NAMES, color.transfer, "transfer") or _UNSPECIFIED
            if av.video.format.VideoFormat(self.spec.pix_fmt).is_rgb:  # RGB samples: no matrix, full range
                context.colorspace, context.color_range = 0, 2
            else:
                matrix = _color_code(_MATRIX_NAMES, color.matrix, "matrix")
                context.colorspace = _UNSPECIFIED if matrix is None else matrix
                context.color_range = self._range if color.range or self.spec.limited_range else 0
        return stream

    def _add_audio_stream(self, audio_rate: int) -> av.audio.stream.AudioStream:
        stream = self._container.add_stream(
            self.spec.audio_encoder, rate=int(audio_rate), options=dict(self.spec.audio_options)
        )
        stream.layout = (
            "mono" if self._audio.shape[0] == 1 else "stereo" if self._audio.shape[0] == 2 else None
        )
        stream.time_base = Fraction(1, int(audio_rate))
        return stream

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """Append (n, H, W, 3) or (H, W, 3) RGB frames: uint8, or uint16 (rgb48) for 10-bit codecs."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[np.newaxis]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise InputError(
                f"{self.path}: frames of shape {frames.shape} do not match the writer's "
                f"(n, {self.height}, {self.width}, 3) RGB"
            )
        if frames.dtype not in (np.uint8, np.uint16):
            raise InputError(f"{self.path}: frames must be uint8 (or uint16) RGB, got {frames.dtype}")
        if self._container is None:
            raise MediaError(f"{self.path}: the writer is already closed or aborted; open a new VideoWriter")
        pixel_format = "rgb24" if frames.dtype == np.uint8 else "rgb48le"
        try:
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=pixel_format)
                frame = frame.reformat(
                    format=self.spec.pix_fmt, dst_colorspace=self._matrix, dst_color_range=self._range
                )
                frame.pts = self._frames_written
                self._container.mux(self._video.encode(frame))
                self._frames_written += 1
                self._mux_audio_until(frame_time(self._frames_written, self.rate))
        except av.error.FFmpegError as err:
            raise MediaError(f"{self.path}: encoding failed ({_reason(err)})") from err

    def _mux_audio_until(self, seconds: Fraction | None) -> None:
        """Encode the audio up to `seconds` (None = all), interleaved with the video for players."""
        if self._audio_stream is None:
            return
        total = self._audio.shape[1]
        rate = self._audio_stream.codec_context.sample_rate
        stop = total if seconds is None else min(total, math.floor(seconds * rate))
        if stop > self._audio_written:
            samples = self._audio[:, self._audio_written : stop]
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples), format="fltp", layout=self._audio_stream.layout.name
            )
            frame.sample_rate, frame.pts = rate, self._audio_written
            self._container.mux(self._audio_stream.encode(frame))
            self._audio_written = stop

    def close(self) -> None:
        """Flush the encoders, finish the file and move it onto `path`."""
        if self._container is None:
            return
        try:
            self._mux_audio_until(None)
            self._container.mux(self._video.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self._temp, self.path)
        except (av.error.FFmpegError, OSError) as err:
            self.abort()
            raise MediaError(f"{self.path}: finishing the file failed ({err}); nothing was written") from err

    def abort(self) -> None:
        """Drop everything written so far; `path` is left as it was."""
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            with contextlib.suppress(av.error.FFmpegError, OSError):
                container.close()
        with contextlib.suppress(OSError):  # absent, or a folder that refused it in the first place
            self._temp.unlink()


def _check_audio(audio: np.ndarray) -> np.ndarray:
    """(n,) mono or (n, channels) float audio -> (channels, n) float32, refusing NaN/inf and >2 channels."""
    audio = np.asarray(audio, dtype=np.float32)
    planar = audio[np.newaxis] if audio.ndim == 1 else audio.T if audio.ndim == 2 else None
    if planar is None or planar.shape[0] not in (1, 2):
        raise InputError(f"audio of shape {audio.shape}: pass (n,) mono or (n, 2) stereo samples")
    if not np.all(np.isfinite(planar)):
        raise InputError("the audio track contains NaN or infinite samples; fix the audio source")
    return np.ascontiguousarray(planar)

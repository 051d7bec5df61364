"""The re-dub pipeline: a video range and a new line of audio in, the same shot speaking the new line out.

``redub`` reads as its stages: 1. check inputs, 2. plan the output timeline, 3. track faces (video-only,
cached by content), 4. choose and prepare the engine, 5. render chunk by chunk and encode with the new audio.
Decoding and encoding run on threads beside the engine (bounded queues), so memory is bounded by a few
chunks, never by the clip length; nothing is written half-way. Stages 1-4 are
``prepare``; its :class:`PreparedRedub` renders any range of output frames, which is how a render farm splits a
job (``retalk.pipeline.segments``).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np

import retalk
from retalk import media
from retalk.cache import ArtifactCache, cache_key
from retalk.checkpoints import find_checkpoint, is_synthetic, missing_checkpoints
from retalk.engines import Engine, SourceClip
from retalk.engines.preview import PreviewEngine
from retalk.errors import CancelledError, CheckpointError, InputError, MediaError
from retalk.pipeline.request import ProgressEvent, RedubRequest, RedubResult
from retalk.pipeline.timing import Timeline, fit_audio, plan_timeline, samples_for_frames
from retalk.tracking import (
    REFERENCE_FILES,
    TRACK_FORMAT,
    FaceSelector,
    FaceTrack,
    Tracker,
    faceless_ranges,
    reference_tracker,
    track_faces,
)

ANALYSIS_RATE = 16000  # what engines hear (the reference's mel features are computed at 16 kHz)
OUTPUT_AUDIO_RATE = 48000  # what the output file carries
CHUNK_FRAMES = 16
# Chunks decoded ahead of the renderer, and rendered chunks waiting for the encoder: decoding and encoding run
# on their own threads beside rendering (the engine never waits for I/O), in memory bounded by a few chunks.
QUEUED_CHUNKS = 1
SILENCE_PEAK = 1e-4  # about -80 dBFS: below this everywhere, the audio is treated as silent
TRACK_CACHE = "tracks"
REQUEST_DEFAULTS = {field.name: field.default for field in fields(RedubRequest)}


def _neural_engine(request: RedubRequest) -> Engine:
    """The neural engine, imported only when chosen: it brings torch and the networks, which the preview
    engine never needs."""
    from retalk.engines.neural import NeuralEngine

    return NeuralEngine(request)


def choose_engine(request: RedubRequest) -> tuple[Engine, list[str]]:
    """The engine to run and the warnings that go with the choice (auto falls back to preview, saying why)."""
    if request.engine == "preview":
        return PreviewEngine(), []
    missing = missing_checkpoints(request.checkpoints, upper_face=request.upper_face != "none")
    if request.engine == "neural":
        if missing:
            raise CheckpointError(
                f"--engine neural needs checkpoints that are missing: {', '.join(missing)}; "
                "get them with `retalk models fetch` (or pass --checkpoints DIR), or use --engine preview"
            )
        return _neural_engine(request), []
    if missing:
        return PreviewEngine(), [
            f"using the preview engine: the neural engine's checkpoints are missing ({', '.join(missing)}); "
            "`retalk models fetch` downloads them"
        ]
    return _neural_engine(request), []


class _FrameReader:
    """Source frames by index for a frame map: decodes forward, keeps at most one decoded chunk, and seeks
    only when the map jumps (a loop restarting, a ping-pong turning)."""

    def __init__(self, path: Path, end: int, chunk_size: int = CHUNK_FRAMES) -> None:
        self.path, self.end, self.chunk_size = path, end, chunk_size
        self._chunks: Iterator[media.FrameChunk] | None = None
        self._frames: np.ndarray | None = None
        self._first = 0  # clip index of self._frames[0]

    def _span(self, a: int, b: int) -> Iterator[np.ndarray]:
        i = a
        while i < b:
            buffered_end = self._first + (len(self._frames) if self._frames is not None else 0)
            if self._frames is not None and self._first <= i < buffered_end:
                take = min(b, buffered_end) - i
                yield self._frames[i - self._first : i - self._first + take]
                i += take
                continue
            if self._chunks is None or i != buffered_end:
                if self._chunks is not None:
                    self._chunks.close()  # release the decoder now, not whenever it is collected
                self._chunks = media.iter_frames(self.path, i, self.end, chunk_size=self.chunk_size)
            chunk = next(self._chunks, None)
            if chunk is None:
                raise MediaError(f"{self.path}: frame {i} could not be decoded; the file may be damaged")
            self._frames, self._first = chunk.frames, chunk.start

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` (any order, repeats allowed) as (n, H, W, 3) uint8 RGB: for consecutive
        indices within one decoded chunk (a plain play-through), a view of it, without a copy."""
        wanted = np.unique(indices)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        parts = [list(self._span(int(run[0]), int(run[-1]) + 1)) for run in np.split(wanted, breaks)]
        if len(parts) == 1 and len(parts[0]) == 1 and np.array_equal(wanted, indices):
            return parts[0][0]
        frames = np.concatenate([piece for part in parts for piece in part])
        return frames[np.searchsorted(wanted, indices)]


_END = object()  # the end of the encoding queue


class _EncodedBehind:
    """``write(item)`` for each item put, on a thread up to ``depth`` items behind the producer. ``finish``
    waits for the last write; what a write raised is raised by the next ``put`` or by ``finish``; ``discard``
    (the producer failed) drops what is queued. Either way the thread has ended when they return."""

    def __init__(self, write: Callable[[object], None], depth: int = QUEUED_CHUNKS) -> None:
        self._write = write
        self._items: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="retalk-encode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._items.get()) is not _END:
            if self._error is None and not self._dropping:
                try:
                    self._write(item)
                except BaseException as err:  # noqa: BLE001 - raised in the producer's thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: object) -> None:
        self._raise()
        self._items.put(item)  # the thread takes every item, written or not: this never blocks for good

    def finish(self) -> None:
        self._items.put(_END)
        self._thread.join()
        self._raise()

    def discard(self) -> None:
        self._dropping = True
        self._items.put(_END)
        self._thread.join()


class _Stages:
    """Progress events and wall time per stage (stages on their own threads overlap: decode with render and
    encode, hash with check and plan, so the times add up to more than the re-dub took); the cancel check
    between units of work."""

    def __init__(self, progress, should_cancel) -> None:
        self.progress, self.should_cancel = progress, should_cancel
        self.seconds: dict[str, float] = {}

    def emit(self, stage: str, done: int, total: int, message: str = "", *, cancellable: bool = True) -> None:
        if cancellable and self.should_cancel is not None and self.should_cancel():
            raise CancelledError(f"the re-dub was cancelled during {stage}; nothing was written")
        if self.progress is not None:
            self.progress(ProgressEvent(stage, done, total, message))

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def _read_new_audio(request: RedubRequest, duration: Fraction | None) -> np.ndarray:
    """The new audio at ANALYSIS_RATE."""
    wav = media.read_audio(
        request.audio, start=request.audio_offset, duration=duration, sample_rate=ANALYSIS_RATE
    )
    if len(wav) == 0:
        raise InputError(
            f"--audio {request.audio}: no audio after --audio-offset {float(request.audio_offset)} s "
            "(the file is empty or shorter than the offset)"
        )
    return wav


def _output_audio(request: RedubRequest, duration: Fraction | None) -> Iterator[np.ndarray]:
    """The new audio at OUTPUT_AUDIO_RATE (one item: for media.Ahead, which makes it on a thread)."""
    yield media.read_audio(
        request.audio, start=request.audio_offset, duration=duration, sample_rate=OUTPUT_AUDIO_RATE
    )


def choose_tracker(request: RedubRequest, engine: str) -> tuple[Tracker, list[str]]:
    """The tracker for the engine that renders and ``request.detector``, with the warnings of the choice.

    The preview engine follows the face with dlib's landmarks between key frames (its speed; it ignores
    ``detector``). The neural engine tracks every frame: with the reference's own networks (S3FD boxes, FAN points)
    where their files are present (``auto``, which passes over the stand-ins `retalk models synth` writes, as they
    find no real face; ``reference`` requires the files), else with dlib."""
    if engine == "preview":
        return Tracker(), []
    if request.detector == "dlib":
        return Tracker(key_interval=None), []
    if request.detector == "reference":
        return reference_tracker(request.checkpoints, request.device), []
    try:
        tracker = reference_tracker(request.checkpoints, request.device)
    except CheckpointError:
        reason = "S3FD and FAN are absent"
    else:
        files = [(find_checkpoint(name, request.checkpoints), name) for name in REFERENCE_FILES]
        if not any(is_synthetic(path, name) for path, name in files):
            return tracker, []
        reason = "the S3FD and FAN found are synthetic stand-ins (--detector reference uses them anyway)"
    return Tracker(key_interval=None), [
        f"tracking with dlib: {reason}, so E-Net sees dlib-shaped face boxes, not the reference's; "
        "`retalk models fetch` gets the real files"
    ]


def _track(
    request: RedubRequest,
    tracker: Tracker,
    start: int,
    end: int,
    content_key: str,
    cache: ArtifactCache | None,
    stages: _Stages,
) -> tuple[FaceTrack, bool]:
    """The face track of frames [start, end), from the cache when the same pixels were tracked before by the
    same tracker (its identity names the detector, the landmark model and every setting)."""
    key = cache_key(content_key, "track", request.face, tracker.identity, TRACK_FORMAT, retalk.__version__)
    cached = cache.get(TRACK_CACHE, key) if cache is not None else None
    if cached is not None:
        try:
            return FaceTrack.load(cached), True
        except InputError:
            cached.unlink(missing_ok=True)  # damaged entry: recompute it
    total = end - start
    decoded = media.Ahead(
        media.iter_frames(request.video, start, end, chunk_size=CHUNK_FRAMES), QUEUED_CHUNKS
    )
    try:  # the next chunk decodes on a thread while this one is tracked
        track = track_faces(
            decoded,
            select=request.face,
            tracker=tracker,
            progress=lambda done: stages.emit("track", done, total),
        )
    finally:
        decoded.close()
    if cache is not None:
        cache.put(TRACK_CACHE, key, track.save)
    return track, False


def faceless_warning(ranges: list[tuple[int, int]], frames: int, shown: int = 8) -> str:
    """One line on the output frames that kept the source because no face was found in them."""
    if ranges == [(0, frames)]:
        return f"no face found in any of {frames} frames: the output is the source"
    spans = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:shown]]
    if len(ranges) > shown:
        spans.append(f"and {len(ranges) - shown} more ranges")
    count = sum(b - a for a, b in ranges)
    return f"no face found in {count} of {frames} frames (output frames {', '.join(spans)}): they are the source's"


@dataclass
class PreparedRedub:
    """A re-dub after stages 1-4: any range of output frames renders from it, in any order, and output frame
    ``i`` is the same whichever range it is rendered in (engines seed per output frame; ranges that start on a
    multiple of CHUNK_FRAMES also see the same chunks as a whole render)."""

    request: RedubRequest
    clip: SourceClip
    timeline: Timeline
    engine: Engine
    wav_out: np.ndarray  # the new audio at OUTPUT_AUDIO_RATE, exactly as long as the output
    warnings: list[str]
    cache_hits: list[str]
    stages: _Stages

    @property
    def frames(self) -> int:
        return self.timeline.frames

    def _decode(self, a: int, b: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(c, d, source frames of output frames [c, d)) for each chunk of [a, b)."""
        frame_map = self.timeline.frame_map
        reader = _FrameReader(self.clip.path, self.clip.end)
        for c in range(a, b, CHUNK_FRAMES):
            d = min(c + CHUNK_FRAMES, b)
            with self.stages.timed("decode"):
                frames = reader.read(frame_map[c:d])
            yield c, d, frames

    def render(self, a: int, b: int) -> Iterator[np.ndarray]:
        """Output frames [a, b), chunk by chunk (reported as stage ``render``, done out of ``b - a``); the
        next chunk decodes on a thread while this one renders. Stage seconds are each stage's own time, so
        decode's overlaps render's."""
        frame_map, clip = self.timeline.frame_map, self.clip
        chunks = media.Ahead(self._decode(a, b), QUEUED_CHUNKS)
        try:
            for c, d, frames in chunks:
                with self.stages.timed("render"):
                    rendered = self.engine.render_chunk(frames, frame_map[c:d], np.arange(c, d))
                    faceless = ~clip.track.found[frame_map[c:d] - clip.start]
                    rendered[faceless] = frames[faceless]
                yield rendered
                self.stages.emit("render", d - a, b - a)
        finally:
            chunks.close()  # stops the decoding thread now, also when the consumer stops early

    def encode(self, writer: media.VideoWriter, a: int, b: int) -> None:
        """Output frames [a, b) rendered into ``writer``, each chunk encoded on a thread while the next one
        renders (stage ``encode``); on any failure, or a cancel, nothing more is written and the error is
        raised once both threads have ended (the caller then aborts the writer)."""

        def write(rendered: np.ndarray) -> None:
            with self.stages.timed("encode"):
                writer.write(rendered)

        behind = _EncodedBehind(write)
        chunks = self.render(a, b)
        try:
            for rendered in chunks:
                behind.put(rendered)
        except BaseException:
            chunks.close()  # a failed write stops the decoding thread too
            behind.discard()
            raise
        behind.finish()

    def writer(self, path: Path, codec: str, *, audio: bool = True) -> media.VideoWriter:
        """A writer of this job's frames into ``path``, with the new audio unless ``audio`` is False."""
        info = self.clip.info
        return media.VideoWriter(
            path,
            width=info.width,
            height=info.height,
            rate=info.rate,
            codec=codec,
            color=info.color,
            audio=self.wav_out if audio else None,
            audio_rate=OUTPUT_AUDIO_RATE,
            fast=self.engine.fast_encode,
        )

    def result(self) -> RedubResult:
        """What the re-dub returns once ``request.output`` is written."""
        faceless = faceless_ranges(self.clip.track.found[self.timeline.frame_map - self.clip.start])
        return RedubResult(
            output=self.request.output,
            frames=self.frames,
            rate=self.clip.info.rate,
            duration=self.timeline.duration,
            engine=self.engine.name,
            faceless_ranges=faceless,
            warnings=self.warnings + ([faceless_warning(faceless, self.frames)] if faceless else []),
            stage_seconds=self.stages.seconds,
            cache_hits=self.cache_hits,
        )


def prepare(
    request: RedubRequest,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    *,
    content_key: str | None = None,
) -> PreparedRedub:
    """Stages 1-4 of a re-dub: everything but rendering and encoding. ``content_key`` (of a job prepared before,
    e.g. on another machine) skips hashing the video range; the track and the engine's video-only work then
    come from the cache."""
    stages = _Stages(progress, should_cancel)
    warnings: list[str] = []
    cache_hits: list[str] = []

    # 1. check inputs
    with stages.timed("check"):
        stages.emit("check", 0, 1)
        request.validate()
        media.check_output(request.output, request.codec)  # a render must never fail at its last step
        FaceSelector(request.face)  # refuses a malformed --face before any work
        info = media.probe(request.video)
        start, end = request.frame_range(info.frame_count)
    # the content hash of stage 3 (the range's packets, not decoded) reads on a thread from here on, beside
    # the audio read and the plan
    hasher = hashlib.sha256() if content_key is None else None
    hashing = output_audio = None
    if hasher is not None:
        chunks = -(-(end - start) // CHUNK_FRAMES)
        packets = media.hash_packets(request.video, start, end, hasher, every=CHUNK_FRAMES)
        hashing = media.Ahead(packets, chunks + 1, "retalk-hash")
    try:
        with stages.timed("check"):
            # --fit video needs the range's length of audio (a second more tells whether some is cut)
            needed = None if request.fit == "audio" else Fraction(end - start) / info.rate + 1
            wav16k = _read_new_audio(request, needed)
            if np.abs(wav16k).max() < SILENCE_PEAK:
                raise InputError(
                    f"--audio {request.audio}: the replacement audio is silent (peak below -80 dBFS); "
                    "check the file and --audio-offset"
                )
            # the output's audio is only encoded: it is resampled on a thread beside stages 2-4
            output_audio = media.Ahead(_output_audio(request, needed), 1, "retalk-audio")
            engine, engine_warnings = choose_engine(request)
            warnings += engine_warnings
            tracker, tracker_warnings = choose_tracker(request, engine.name)
            warnings += tracker_warnings
            warnings += [
                f"--{name.replace('_', '-')} {getattr(request, name)} has no effect with the {engine.name} engine"
                for name in engine.ignores
                if getattr(request, name) != REQUEST_DEFAULTS[name]
            ]
            stages.emit("check", 1, 1)

        # 2. plan the output timeline: frame map and sample-exact audio lengths
        with stages.timed("plan"):
            timeline: Timeline = plan_timeline(
                start=start,
                end=end,
                rate=info.rate,
                audio_samples=len(wav16k),
                sample_rate=ANALYSIS_RATE,
                fit=request.fit,
                extend=request.extend,
                audio_complete=needed is None or len(wav16k) < round(needed * ANALYSIS_RATE),
            )
            warnings += timeline.warnings
            n_out = timeline.frames
            wav16k = fit_audio(wav16k, timeline.audio_samples)

        # 3. track faces (video-only: cached by content, never by file name)
        if hashing is not None:
            with stages.timed("hash"):
                for done in hashing:
                    stages.emit("hash", done, end - start)
            content_key = hasher.hexdigest()
        cache = ArtifactCache(request.cache_dir) if request.use_cache else None
        with stages.timed("track"):
            track, hit = _track(request, tracker, start, end, content_key, cache, stages)
            if hit:
                cache_hits.append("track")
            stages.emit("track", end - start, end - start, "from cache" if hit else "")

        # 4. the engine's video-only and audio-only preparation
        with stages.timed("prepare"):
            clip = SourceClip(request.video, info, start, end, content_key, track, cache, request.device)
            cache_hits += engine.prepare(clip, stages.emit)
            warnings += engine.listen(wav16k, info.rate, n_out)
            (wav_out,) = output_audio
            wav_out = fit_audio(wav_out, samples_for_frames(n_out, info.rate, OUTPUT_AUDIO_RATE))
    finally:
        for thread in (hashing, output_audio):
            if thread is not None:
                thread.close()  # bad audio, a cancel, a failure: their threads stop too

    return PreparedRedub(request, clip, timeline, engine, wav_out, warnings, cache_hits, stages)


def redub(
    request: RedubRequest,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> RedubResult:
    """Re-dub ``request.video`` frames [start, end) with ``request.audio``; see :class:`RedubRequest`."""
    return render_and_encode(prepare(request, progress, should_cancel))


def render_and_encode(job: PreparedRedub) -> RedubResult:
    """Stage 5 of a re-dub: every output frame, chunk by chunk, encoded with the new audio into the output."""
    stages, request = job.stages, job.request
    stages.emit("render", 0, job.frames)
    writer = job.writer(request.output, request.codec)
    try:
        job.encode(writer, 0, job.frames)
        stages.emit("encode", 0, 1)
        with stages.timed("encode"):
            writer.close()  # the file appears whole, or (abort below) not at all
    except BaseException:
        writer.abort()
        raise
    stages.emit("encode", 1, 1, cancellable=False)
    return job.result()

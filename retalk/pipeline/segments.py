"""A re-dub split into segments of output frames, rendered on different machines, assembled into one file.

A render farm (``retalk_server.ray_pool``) runs a long job in three steps:
  1. ``redub.prepare`` once over the whole range: tracking over the whole range, so its smoothing is the same as
     on one machine, and the engine's video-only work into the content-keyed cache;
  2. ``render_segment`` for each range of ``plan_segments``, on any machine (``redub.prepare`` there again, from
     the cache: ``content_key`` skips hashing), each segment a video-only file;
  3. ``assemble``: one encode with the new audio, or for intra-only codecs the segments' packets as they are.
Engines seed per output frame and segments start on multiples of the segment size, so the result equals a
one-machine render bit for bit (lossless codec; other codecs: the same frames into the same encoder).
"""

from __future__ import annotations

import math
import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from retalk import media
from retalk.errors import InputError, MediaError
from retalk.pipeline.redub import CHUNK_FRAMES, OUTPUT_AUDIO_RATE, PreparedRedub
from retalk.pipeline.request import RedubResult

# Frames per segment, a multiple of CHUNK_FRAMES (every segment renders the same chunks as one machine would).
# Measured with benchmarks/farm.py (preview engine, 2 loaded CPU cores): a worker's first segment of a job costs
# 0.3 s more (the job prepared again from the cache), 4 % of 256 frames at 32 ms a frame, and less with the
# neural engine; 256 still spreads a 2-minute scene (3,000 frames) over 12 workers.
DEFAULT_SEGMENT_FRAMES = 256
# Codecs that code every frame on its own: their segments are concatenated without re-encoding.
INTRA_ONLY = ("lossless", "prores", "prores4444")


def plan_segments(frames: int, segment_frames: int) -> list[tuple[int, int]]:
    """Output-frame ranges [a, b) of at most ``segment_frames`` frames covering ``frames`` output frames."""
    if segment_frames < 1:
        raise InputError(f"--segment-frames {segment_frames}: expected at least 1 frame a segment")
    return [(a, min(a + segment_frames, frames)) for a in range(0, frames, segment_frames)]


def segment_codec(codec: str) -> str:
    """The codec segments are written in: the job's own when intra-only, else lossless (encoded once later)."""
    return codec if codec in INTRA_ONLY else "lossless"


def segment_path(folder: Path, codec: str, a: int, b: int) -> Path:
    return folder / f"{a:08d}-{b:08d}{media.default_extension(segment_codec(codec))}"


def render_segment(job: PreparedRedub, a: int, b: int, path: Path) -> None:
    """Output frames [a, b) of ``job`` into ``path`` (video only), written whole or not at all."""
    writer = job.writer(path, segment_codec(job.request.codec), audio=False)
    job.stages.emit("render", 0, b - a)
    try:
        job.encode(writer, a, b)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def assemble(job: PreparedRedub, paths: list[Path]) -> RedubResult:
    """``job.request.output`` from its segment files (in output order) and the new audio."""
    held = sum(media.probe(path).frame_count for path in paths)
    if held != job.frames:
        raise MediaError(
            f"{paths[0].parent}: the segments hold {held} frames, the job has {job.frames}; "
            "a segment file was changed: submit the job again"
        )
    job.stages.emit("encode", 0, job.frames)
    if job.request.codec in INTRA_ONLY and _same_parameters(paths):
        _concatenate(job, paths)
    else:
        writer = job.writer(job.request.output, job.request.codec)
        try:
            done = 0
            for path in paths:
                for chunk in media.iter_frames(path, chunk_size=CHUNK_FRAMES):
                    writer.write(chunk.frames)
                    done += len(chunk.frames)
                    job.stages.emit("encode", done, job.frames)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    job.stages.emit("encode", job.frames, job.frames, cancellable=False)
    return job.result()


def _same_parameters(paths: list[Path]) -> bool:
    """Whether every segment's video stream has the same codec parameters (an FFmpeg of another version on one
    machine may differ): only then can their packets form one stream."""
    seen = set()
    for path in paths:
        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            seen.add(
                (
                    context.name,
                    context.pix_fmt,
                    context.width,
                    context.height,
                    bytes(context.extradata or b""),
                )
            )
    return len(seen) == 1


def _concatenate(job: PreparedRedub, paths: list[Path]) -> None:
    """The segments' video packets, renumbered as one stream, with the new audio interleaved as the encoder of a
    one-machine render interleaves it; written to a hidden file renamed onto the output at the end."""
    output, spec = job.request.output, media.CODECS[job.request.codec]
    rate = job.clip.info.rate
    tick = Fraction(1) / rate  # one frame: packets count frames (the muxer rescales to its own time base)
    temp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.part")
    audio = np.ascontiguousarray(job.wav_out[np.newaxis], dtype=np.float32)  # (1, n) planar mono
    try:
        container = media.container_for(output, job.request.codec)  # the output's suffix picks it
        with av.open(str(paths[0])) as first, av.open(str(temp), "w", format=container) as out:
            video = out.add_stream_from_template(first.streams.video[0])
            video.time_base = tick
            video.codec_context.framerate = rate  # the muxer's frame rate (Matroska's default duration)
            sound = out.add_stream(
                spec.audio_encoder, rate=OUTPUT_AUDIO_RATE, options=dict(spec.audio_options)
            )
            sound.layout, sound.time_base = "mono", Fraction(1, OUTPUT_AUDIO_RATE)
            index = written = 0
            for path in paths:
                with av.open(str(path)) as segment:
                    for packet in segment.demux(segment.streams.video[0]):
                        if packet.size == 0:  # the demuxer's flush packet
                            continue
                        packet.stream = video
                        packet.pts = packet.dts = index
                        packet.time_base, packet.duration = tick, 1
                        out.mux(packet)
                        index += 1
                        stop = min(audio.shape[1], math.floor(Fraction(index) / rate * OUTPUT_AUDIO_RATE))
                        written = _mux_audio(out, sound, audio, written, stop)
                job.stages.emit("encode", index, job.frames)
            _mux_audio(out, sound, audio, written, audio.shape[1])
            out.mux(sound.encode(None))
        os.replace(temp, output)
    except (av.error.FFmpegError, OSError) as err:
        temp.unlink(missing_ok=True)
        raise MediaError(f"{output}: joining the segments failed ({err}); nothing was written") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _mux_audio(out, stream, audio: np.ndarray, written: int, stop: int) -> int:
    if stop > written:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio[:, written:stop]), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts = OUTPUT_AUDIO_RATE, written
        out.mux(stream.encode(frame))
    return max(stop, written)

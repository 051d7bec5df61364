"""A re-dub split into segments (retalk.pipeline.segments) without a cluster: each segment prepared afresh from
the cache, as another machine would, then assembled; the result equals the one-process render frame for frame
and sample for sample, for an intra-only codec (packets concatenated) and for H.264 (one encode)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from mediagen import write_face_clip, write_tone

from retalk import media
from retalk.errors import InputError, MediaError
from retalk.pipeline import RedubRequest, redub
from retalk.pipeline.redub import prepare
from retalk.pipeline.segments import assemble, plan_segments, render_segment, segment_path

RATE = Fraction(1350, 61)  # a rate Matroska cannot store exactly: the joined file must keep it
FRAMES = 21


def test_plan_covers_every_frame_once_in_order():
    assert plan_segments(37, 16) == [(0, 16), (16, 32), (32, 37)]
    assert plan_segments(16, 16) == [(0, 16)]
    assert plan_segments(3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(InputError, match="--segment-frames 0"):
        plan_segments(10, 0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segments")
    clip = write_face_clip(
        folder / "clip.mkv", n_frames=FRAMES, rate=RATE, codec="lossless", blank_frames=[17]
    )
    return folder, clip, write_tone(folder / "line.wav", FRAMES / float(RATE))


def _request(inputs, name: str, codec: str) -> RedubRequest:
    folder, clip, audio = inputs
    return RedubRequest(
        video=clip,
        audio=audio,
        output=folder / f"{name}{media.default_extension(codec)}",
        engine="preview",
        codec=codec,
        cache_dir=folder / "cache",
    )


def _split(inputs, codec: str, segment_frames: int):
    """Prepare once (as the farm's first step), then render each segment and assemble from fresh preparations
    keyed by the content (as other machines would)."""
    request = _request(inputs, f"split-{codec}-{segment_frames}", codec)
    planned = prepare(request)
    folder = request.output.with_name(request.output.name + ".segments")
    folder.mkdir()
    paths = []
    for a, b in plan_segments(planned.frames, segment_frames):
        elsewhere = prepare(request, content_key=planned.clip.content_key)
        assert "track" in elsewhere.cache_hits  # the whole-range track, not one of this segment
        paths.append(segment_path(folder, codec, a, b))
        render_segment(elsewhere, a, b, paths[-1])
    return assemble(prepare(request, content_key=planned.clip.content_key), paths), paths


def _decoded(path):
    frames = np.concatenate([chunk.frames for chunk in media.iter_frames(path)])
    return frames, media.read_audio(path, sample_rate=48000)


@pytest.mark.parametrize(
    ("codec", "segment_frames"), [("lossless", 16), ("lossless", 7), ("prores", 16), ("h264", 16)]
)
def test_split_render_equals_the_one_process_render(inputs, codec, segment_frames):
    whole = redub(_request(inputs, f"whole-{codec}", codec))
    result, paths = _split(inputs, codec, segment_frames)
    assert len(paths) == -(-FRAMES // segment_frames)
    assert whole.faceless_ranges == [(17, 18)]  # the blank frame, passed through in its segment
    assert (result.frames, result.rate, result.faceless_ranges) == (FRAMES, RATE, whole.faceless_ranges)
    frames, audio = _decoded(result.output)
    expected_frames, expected_audio = _decoded(whole.output)
    assert frames.shape == expected_frames.shape and np.array_equal(frames, expected_frames)
    assert len(audio) == len(expected_audio) and np.array_equal(audio, expected_audio)
    info, expected = media.probe(result.output), media.probe(whole.output)
    assert (info.rate, info.frame_count, info.color, info.pix_fmt) == (
        expected.rate,
        expected.frame_count,
        expected.color,
        expected.pix_fmt,
    )
    with av.open(str(result.output)) as joined, av.open(str(whole.output)) as one:
        assert joined.streams.video[0].codec_context.codec_tag == one.streams.video[0].codec_context.codec_tag


def test_assemble_refuses_segments_that_do_not_add_up(inputs):
    request = _request(inputs, "short", "lossless")
    job = prepare(request)
    folder = request.output.with_name("short.segments")
    folder.mkdir()
    path = segment_path(folder, "lossless", 0, 16)
    render_segment(job, 0, 16, path)
    with pytest.raises(MediaError, match=f"the segments hold 16 frames, the job has {FRAMES}"):
        assemble(job, [path])
    assert not request.output.exists()

"""The re-dub pipeline end to end with the preview engine: exact timing, untouched pixels, faceless frames,
the tracking cache, bad input and cancellation (nothing left behind)."""

from __future__ import annotations

import itertools
import os
import threading
from fractions import Fraction

import cv2
import numpy as np
import pytest
import soundfile
from mediagen import face_image, write_face_clip, write_tone

from retalk import media
from retalk.cache import ArtifactCache, cache_key
from retalk.errors import CancelledError, CheckpointError, InputError, MediaError
from retalk.pipeline import ProgressEvent, RedubRequest, redub
from retalk.pipeline.redub import prepare, render_and_encode
from retalk.tracking import track_faces

OUT_SR = 48000  # the sample rate redub writes


RATE = Fraction(1350, 61)
START, END = 1, 15  # the range every test re-dubs, so the tracking cache is filled once for the module


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 16-frame face clip at 1350/61 fps with a faceless stretch [6, 9), and its face track."""
    path = tmp_path_factory.mktemp("clip") / "clip.mkv"
    write_face_clip(path, n_frames=16, rate=RATE, codec="lossless", blank_frames=range(6, 9))
    return path, track_faces(media.iter_frames(path))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def request(tmp_path, video, audio, cache_dir, **kwargs) -> RedubRequest:
    kwargs.setdefault("output", tmp_path / "out.mkv")
    return RedubRequest(
        video=video, audio=audio, engine="preview", codec="lossless", cache_dir=cache_dir, **kwargs
    )


def outside_face(track, i: int, shape) -> np.ndarray:
    """Pixels farther than half the landmark box's size from it (True = must be untouched)."""
    mask = np.ones(shape[:2], bool)
    if track.found[i]:
        (x0, y0), (x1, y1) = track.landmarks[i].min(0), track.landmarks[i].max(0)
        w, h = x1 - x0, y1 - y0
        mask[
            max(int(y0 - 0.5 * h), 0) : int(y1 + 0.5 * h) + 1,
            max(int(x0 - 0.5 * w), 0) : int(x1 + 0.5 * w) + 1,
        ] = False
    return mask


def test_fit_video_exact_output_and_untouched_pixels(tmp_path, clip, cache_dir):
    video, track = clip
    audio = write_tone(tmp_path / "line.wav", 1.0)  # longer than the range: cut, with a warning
    result = redub(request(tmp_path, video, audio, cache_dir, start=START, end=END))
    n = END - START
    info = media.probe(result.output)
    assert (result.frames, result.rate, result.duration) == (n, RATE, Fraction(n) / RATE)
    assert (info.frame_count, info.rate, info.duration) == (n, RATE, Fraction(n) / RATE)
    assert len(media.read_audio(result.output, sample_rate=OUT_SR)) == round(Fraction(n) / RATE * OUT_SR)
    assert any("cut" in w for w in result.warnings)
    assert result.faceless_ranges == [(6 - START, 9 - START)]

    out = media.read_frames(result.output, 0, n)
    src = media.read_frames(video, START, END)
    changed_frames = 0
    for i in range(n):
        keep = outside_face(track, i + START, src.shape[1:])
        assert np.array_equal(out[i][keep], src[i][keep]), f"frame {i}: pixels away from the face changed"
        if not track.found[i + START]:
            assert np.array_equal(out[i], src[i]), f"faceless frame {i} was modified"
        changed_frames += bool(np.any(out[i] != src[i]))
    assert changed_frames >= n - 3 - 3  # all but the faceless frames and a few quiet ones


EXTENDED = {  # range [1, 15) shown for 27 frames
    "loop": list(range(1, 15)) + list(range(1, 14)),
    "pingpong": list(range(1, 15)) + list(range(13, 0, -1)),
    "hold": list(range(1, 15)) + [14] * 13,
}


@pytest.mark.parametrize("extend", sorted(EXTENDED))
def test_fit_audio_extends_the_range_with_exact_lengths(tmp_path, clip, cache_dir, extend):
    video, track = clip
    audio = write_tone(tmp_path / "line.wav", 1.2)  # 1.2 s = 26.6 frames at 1350/61 fps -> 27 frames
    result = redub(
        request(tmp_path, video, audio, cache_dir, start=START, end=END, fit="audio", extend=extend)
    )
    assert result.frames == 27 and media.probe(result.output).frame_count == 27
    assert result.duration == Fraction(27) / RATE
    assert len(media.read_audio(result.output, sample_rate=OUT_SR)) == round(Fraction(27) / RATE * OUT_SR)
    out = media.read_frames(result.output, 0, 27)
    src = media.read_frames(video, 0, 16)
    for i, s in enumerate(EXTENDED[extend]):
        keep = outside_face(track, s, src.shape[1:])
        assert np.array_equal(out[i][keep], src[s][keep]), f"output frame {i} is not source frame {s}"
        if not track.found[s]:
            assert np.array_equal(out[i], src[s])


def test_second_take_hits_the_tracking_cache_and_changed_pixels_miss_it(tmp_path):
    cache_dir = tmp_path / "cache"
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=6, size=(320, 240))
    first = redub(request(tmp_path, video, write_tone(tmp_path / "a.wav", 0.5), cache_dir))
    second = redub(request(tmp_path, video, write_tone(tmp_path / "b.wav", 0.3), cache_dir))
    assert first.cache_hits == [] and second.cache_hits == ["track", "mouths"]
    assert "track" not in second.stage_seconds or second.stage_seconds["track"] < first.stage_seconds["track"]

    # same file name, different pictures: the cache is keyed by content, never by name
    write_face_clip(video, n_frames=6, size=(320, 240), motion=False)
    third = redub(request(tmp_path, video, tmp_path / "b.wav", cache_dir))
    assert third.cache_hits == []
    uncached = redub(request(tmp_path, video, tmp_path / "b.wav", tmp_path / "other", use_cache=False))
    assert uncached.cache_hits == [] and not (tmp_path / "other").exists()


def pipeline_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name in ("retalk-hash", "retalk-audio", "retalk-decode", "retalk-encode")
    ]


def write_wav(path, samples, subtype="FLOAT"):
    soundfile.write(path, np.asarray(samples, np.float32), 16000, subtype=subtype)
    return path


BAD_AUDIO = {
    "silent": lambda p: write_wav(p, np.zeros(8000)),
    "nan": lambda p: write_wav(p, np.where(np.arange(8000) % 100 == 0, np.nan, 0.3)),
    "empty": lambda p: write_wav(p, np.zeros(0)),
    "corrupt": lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)) and p,
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_is_refused_with_one_line_and_no_output(tmp_path, clip, cache_dir, case):
    audio = BAD_AUDIO[case](tmp_path / "bad.wav")
    req = request(tmp_path, clip[0], audio, cache_dir, start=START, end=END)
    with pytest.raises((InputError, MediaError)) as err:
        redub(req)
    message = str(err.value)
    assert message and "\n" not in message
    if case == "silent":
        assert "silent" in message
    assert [p.name for p in tmp_path.iterdir()] == ["bad.wav"]
    assert pipeline_threads() == []  # the video's hashing, begun beside the audio read, stopped with it


def test_bad_video_and_range_are_refused_with_no_output(tmp_path, clip, cache_dir):
    tone = write_tone(tmp_path / "line.wav", 0.5)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).bytes(20000))
    silent_clip = write_face_clip(tmp_path / "mute.mp4", n_frames=4, with_audio=False)
    cases = [
        (dict(video=tone, audio=tone), MediaError),  # no video stream
        (dict(video=garbage, audio=tone), MediaError),  # corrupt
        (dict(video=clip[0], audio=silent_clip), MediaError),  # no audio stream
        (dict(video=clip[0], audio=tone, start=10, end=99), InputError),  # range past the clip's 16 frames
        (dict(video=clip[0], audio=tone, end=5, start=5), InputError),  # empty range
    ]
    for kwargs, error in cases:
        video, audio = kwargs.pop("video"), kwargs.pop("audio")
        with pytest.raises(error) as err:
            redub(request(tmp_path, video, audio, cache_dir, **kwargs))
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.mp4", "line.wav", "mute.mp4"]


def test_cancel_midway_leaves_nothing(tmp_path, clip, cache_dir):
    audio = write_tone(tmp_path / "line.wav", 2.0)
    seen: list[ProgressEvent] = []
    rendering = lambda: any(e.stage == "render" and e.done >= 16 for e in seen)  # noqa: E731
    req = request(tmp_path, clip[0], audio, cache_dir, start=START, end=END, fit="audio")
    with pytest.raises(CancelledError):
        redub(req, progress=seen.append, should_cancel=rendering)
    assert any(e.stage == "render" and e.done == 16 for e in seen)  # cancelled after a chunk was encoded
    assert [p.name for p in tmp_path.iterdir()] == ["line.wav"]
    assert pipeline_threads() == []  # the decoding and encoding threads stopped with it


def test_cancel_while_tracking_stops_the_output_audio_thread(tmp_path, clip):
    audio = write_tone(tmp_path / "line.wav", 2.0)
    seen: list[ProgressEvent] = []
    tracking = lambda: any(e.stage == "track" for e in seen)  # noqa: E731
    req = request(tmp_path, clip[0], audio, tmp_path / "cache", start=START, end=END)
    with pytest.raises(CancelledError, match="during track"):
        redub(req, progress=seen.append, should_cancel=tracking)
    assert pipeline_threads() == []  # the output audio, resampled beside tracking, stopped with it


def test_decoding_ahead_raises_the_threads_error_and_stops_when_the_consumer_does():
    def failing():
        yield 1
        raise MediaError("frame 1 could not be decoded")

    with pytest.raises(MediaError, match="frame 1"):
        list(media.Ahead(failing()))
    made = []
    endless = iter(media.Ahead(made.append(i) or i for i in itertools.count()))
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()
    assert pipeline_threads() == []
    assert len(made) <= 3 + 2  # the item queued and the one being made when the consumer stopped


def test_a_decode_error_while_rendering_is_raised_and_leaves_nothing(tmp_path, clip, cache_dir, monkeypatch):
    audio = write_tone(tmp_path / "line.wav", 2.0)
    job = prepare(request(tmp_path, clip[0], audio, cache_dir, start=START, end=END, fit="audio"))
    decode = media.iter_frames

    def damaged(path, start, end, **kwargs):
        for chunk in decode(path, start, end, **kwargs):
            if chunk.start + len(chunk.frames) > START + 10:
                raise MediaError(f"{path}: frame {START + 10} could not be decoded; the file may be damaged")
            yield chunk

    monkeypatch.setattr(media, "iter_frames", damaged)
    with pytest.raises(MediaError, match="could not be decoded"):
        render_and_encode(job)
    assert [p.name for p in tmp_path.iterdir()] == ["line.wav"]
    assert pipeline_threads() == []


def test_an_encoding_error_stops_rendering_and_leaves_nothing(tmp_path, clip, cache_dir, monkeypatch):
    audio = write_tone(tmp_path / "line.wav", 4.0)  # 88 output frames: 6 chunks
    seen: list[ProgressEvent] = []
    job = prepare(
        request(tmp_path, clip[0], audio, cache_dir, start=START, end=END, fit="audio"), progress=seen.append
    )

    def full_disk(self, frames):
        raise MediaError(f"{self.path}: encoding failed (No space left on device)")

    monkeypatch.setattr(media.VideoWriter, "write", full_disk)
    with pytest.raises(MediaError, match="No space left"):
        render_and_encode(job)
    # the renderer is at most a chunk being written, one queued and one rendering ahead of the failure
    assert max(e.done for e in seen if e.stage == "render") <= 4 * 16 < job.frames
    assert [p.name for p in tmp_path.iterdir()] == ["line.wav"]
    assert pipeline_threads() == []


def test_neural_engine_without_checkpoints_names_what_is_missing(tmp_path, clip, cache_dir, monkeypatch):
    monkeypatch.setenv("RETALK_CHECKPOINTS", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    audio = write_tone(tmp_path / "line.wav", 0.5)
    req = request(tmp_path, clip[0], audio, cache_dir, start=START, end=END)
    req.engine = "neural"
    with pytest.raises(CheckpointError, match="LNet.pth"):
        redub(req)
    req.engine = "auto"
    result = redub(req)
    assert result.engine == "preview"
    assert sum("preview engine" in w for w in result.warnings) == 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"device": "gpu"}, "--device"),
        ({"face": "left"}, "face selection"),
        ({"fit": "both"}, "--fit"),
        ({"audio_offset": Fraction(-1)}, "--audio-offset"),
        ({"expression": "no-such-image.png"}, "--expression"),
        ({"output": "VIDEO"}, "overwrite an input"),
        ({"output": "nowhere/out.mkv"}, "does not exist"),
    ],
)
def test_bad_requests_are_refused_before_any_work(tmp_path, clip, cache_dir, change, fragment):
    audio = write_tone(tmp_path / "line.wav", 0.5)
    change = dict(change)
    if change.get("output") == "VIDEO":
        change["output"] = clip[0]
    elif "output" in change:
        change["output"] = tmp_path / change["output"]
    with pytest.raises(InputError, match=fragment) as err:
        redub(request(tmp_path, clip[0], audio, cache_dir, **change))
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["line.wav"]


def test_cache_evicts_the_least_recently_used_entries(tmp_path):
    cache = ArtifactCache(tmp_path, max_bytes=2500)
    (tmp_path / "checkpoints").mkdir()  # the user cache folder also holds checkpoints: never evicted
    (tmp_path / "checkpoints" / "LNet.pth").write_bytes(b"w" * 5000)

    def put(name: str, mtime: int | None = None):
        path = cache.put("kind", cache_key(name), lambda p: p.write_bytes(b"x" * 1000))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    put("a", 100)
    put("b", 200)
    put("c", 300)  # 3000 bytes: "a", used longest ago, goes
    assert cache.get("kind", cache_key("a")) is None and cache.size() == 2000
    assert cache.get("kind", cache_key("b")) is not None  # "b" is used now: "c" is the oldest
    put("d")
    assert [cache.get("kind", cache_key(k)) is not None for k in "bcd"] == [True, False, True]
    assert not list(tmp_path.glob("kind/.tmp-*"))
    assert (tmp_path / "checkpoints" / "LNet.pth").stat().st_size == 5000


def test_colour_metadata_is_carried_to_the_output(tmp_path, cache_dir):
    colour = media.ColorInfo(range="tv", primaries="bt709", transfer="bt709", matrix="bt709")
    video = tmp_path / "tagged.mp4"
    frame = np.zeros((240, 320, 3), np.uint8)
    frame[40:200, 80:240] = cv2.resize(face_image(), (160, 160))
    with media.VideoWriter(video, width=320, height=240, rate=Fraction(30000, 1001), color=colour) as writer:
        writer.write(np.stack([frame] * 4))
    audio = write_tone(tmp_path / "line.wav", 0.2)
    result = redub(
        RedubRequest(
            video=video, audio=audio, output=tmp_path / "out.mp4", engine="preview", cache_dir=cache_dir
        )
    )
    info = media.probe(result.output)
    assert info.color == media.probe(video).color == colour
    assert (info.rate, info.frame_count, info.width, info.height) == (Fraction(30000, 1001), 4, 320, 240)


def test_audio_offset_picks_the_line_sample_exactly(tmp_path, clip, cache_dir):
    t = np.arange(48000 * 2) / 48000
    line = tmp_path / "line.wav"
    soundfile.write(
        line, (0.5 * np.sin(2 * np.pi * 3 * t) * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48000
    )
    offset = Fraction(3, 10)
    result = redub(request(tmp_path, clip[0], line, cache_dir, start=START, end=END, audio_offset=offset))
    n = round(Fraction(END - START) / RATE * OUT_SR)
    written = media.read_audio(result.output, sample_rate=OUT_SR)
    expected = media.read_audio(line, start=offset, sample_rate=OUT_SR)[:n]
    assert len(written) == n
    assert np.abs(written - expected).max() < 1e-5  # 24-bit PCM in the lossless container


def test_neural_only_options_with_the_preview_engine_are_named_in_warnings(tmp_path, clip, cache_dir):
    audio = write_tone(tmp_path / "line.wav", 0.5)
    req = request(tmp_path, clip[0], audio, cache_dir, start=START, end=START + 4)
    req.engine, req.expression, req.upper_face, req.precision = "preview", "smile", "sad", "bf16"
    result = redub(req)
    ignored = [w for w in result.warnings if "has no effect with the preview engine" in w]
    assert sorted(w.split()[0] for w in ignored) == ["--expression", "--precision", "--upper-face"]

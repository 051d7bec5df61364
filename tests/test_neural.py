"""The neural engine: stage functions with stand-in networks (colour orders, geometry, noise), then the
whole re-dub with synthetic checkpoints on a generated clip and on frames of the shared clips (meaningless
images: structure, exact timing for --fit video and --fit audio, untouched pixels, faceless frames, determinism
and the prepare cache)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import soundfile
import torch
from mediagen import face_image, write_face_clip, write_tone

from retalk import media
from retalk.checkpoints import synth
from retalk.engines import neural_steps as steps
from retalk.engines.geometry import FaceGeometry, nearest_found
from retalk.engines.neural import render_faces
from retalk.errors import CancelledError
from retalk.pipeline import RedubRequest, RedubResult, redub
from retalk.tracking import FaceTrack, track_faces

RATE = Fraction(25)
OUT_SR = 48000
CPU = torch.device("cpu")


# --- stage functions with stand-in networks --------------------------------------------------------------------


def test_lip_sync_keeps_rgb_and_feeds_enet_bgr_with_the_lower_half_masked():
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
    refs = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
    calls = []

    def enet(mel, img_batch, reference, noise):
        calls.append((img_batch, noise))
        return reference, None  # a stand-in that returns its reference unchanged

    noise = steps.per_frame_noise([1, 2], steps.enet_noise_shapes(), CPU)
    out = steps.lip_sync(enet, np.zeros((2, 80, 16)), faces, refs, noise, CPU)
    np.testing.assert_array_equal(out, refs)  # RGB in, E-Net's BGR world, RGB out
    img = torch.cat([img_batch for img_batch, _ in calls])  # the frames may come in several batches
    masked = (img[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert not masked[:, 192:].any()
    np.testing.assert_array_equal(masked[:, :192], faces[:, :192, :, ::-1])  # BGR
    given = [torch.cat(maps) for maps in zip(*(noise for _, noise in calls), strict=True)]
    assert [tuple(n.shape) for n in given] == [(2, 1, 200, 200)] * 2 + [(2, 1, 400, 400)] * 2
    for a, b in zip(given, noise, strict=True):  # each frame's row goes to its own batch slot
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_frame_noise_does_not_depend_on_batch_mates():
    shapes = [(4, 4), (8, 8)]
    alone = steps.per_frame_noise([7], shapes, CPU)
    together = steps.per_frame_noise([3, 7], shapes, CPU)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
        assert not torch.equal(b[0], b[1])


def _generated_frame(media_dir) -> np.ndarray:
    frame = np.zeros((360, 480, 3), np.uint8)
    frame[52:308, 112:368] = face_image()
    return frame


def _face1_frame(media_dir) -> np.ndarray:
    return next(media.iter_frames(media_dir / "face1.mp4", 0, 1)).frames[0]


@pytest.fixture(params=[_generated_frame, _face1_frame], ids=["generated", "face1"])
def face_frame(request):
    # face1 needs ../shared: ask for the fixture (it skips when absent) only for that case
    media_dir = request.getfixturevalue("media_dir") if request.param is _face1_frame else None
    return request.param(media_dir)


def test_restored_face_pastes_back_where_it_was_taken(face_frame):
    """An identity 'restorer' (the aligned input itself) pasted back reproduces the frame inside the face."""
    frame = face_frame
    height, width = frame.shape[:2]
    track = track_faces([frame])
    assert track.found[0]
    geometry = FaceGeometry.from_track(track, width, height)
    crops, matrices = steps.gfpgan_align(frame[None], geometry.restore_points)
    box = geometry.enet_boxes[0]
    area = steps.face_area(box, width, height)
    back = steps.paste_back_restored(np.zeros_like(frame), crops[0], matrices[0], area)
    region = steps.cut(frame, area.box)
    x1, y1, x2, y2 = area.local(box)
    qw, qh = (x2 - x1) // 4, (y2 - y1) // 4  # the central half of the box, well inside the soft mask
    inner = (slice(y1 + qh, y2 - qh), slice(x1 + qw, x2 - qw))
    error = np.abs(back[inner].astype(int) - region[inner].astype(int))
    assert error.mean() < 2  # resampling twice; a one-pixel misplacement gives more than 8


def test_paste_back_in_an_area_is_the_whole_frame_paste_back(face_frame):
    """The paste-back computed for a region around the face equals the whole-frame paste-back there."""
    frame = face_frame
    height, width = frame.shape[:2]
    geometry = FaceGeometry.from_track(track_faces([frame]), width, height)
    crops, matrices = steps.gfpgan_align(frame[None], geometry.restore_points)
    restored = 255 - crops[0]
    area = steps.face_area(geometry.enet_boxes[0], width, height)
    whole = steps.paste_back_restored(
        frame, restored, matrices[0], steps.BlendArea((0, 0, width, height), (1, 1))
    )
    local = steps.paste_back_restored(frame, restored, matrices[0], area)
    error = np.abs(local.astype(int) - steps.cut(whole, area.box).astype(int))
    assert error.max() <= 1 and (error > 0).mean() < 1e-3  # warps shifted by whole pixels round alike


def test_reference_crop_is_the_frame_outside_the_head_quad():
    frame = np.zeros((360, 480, 3), np.uint8)
    frame[52:308, 112:368] = face_image()
    geometry = FaceGeometry.from_track(track_faces([frame]), 480, 360)
    white = np.full((1, 256, 256, 3), 255, np.uint8)
    ref = steps.reference_crops(
        frame[None], geometry.crop_boxes, white, geometry.stit_quads, geometry.enet_boxes
    )[0]
    assert ref.shape == (384, 384, 3)
    np.testing.assert_array_equal(ref[192, 192], [255, 255, 255])  # the face centre is the pasted face
    original = steps.crop_resized(frame, geometry.enet_boxes[0], 384)
    assert (ref == original).all(axis=2).mean() < 0.5  # most of the E-Net box lies inside the quad


def test_upper_face_edit_keeps_the_synthesised_lower_half():
    rng = np.random.default_rng(2)
    faces = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
    pred = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)

    def keep_input(source, aus):  # attention 1 everywhere: GANimation returns its input face
        assert source.shape == (2, 3, 128, 128) and aus.shape == (2, 17)
        return torch.zeros_like(source), torch.ones_like(source[:, :1]), None

    out = steps.edit_upper_face(keep_input, faces, pred, torch.zeros(1, 17), CPU)
    np.testing.assert_array_equal(out[:, 192:], pred[:, 192:])
    down_up = [cv2.resize(cv2.resize(f, (128, 128)), (384, 384)) for f in faces]  # bilinear 384 -> 128 -> 384
    error = np.abs(out[:, :192].astype(int) - np.stack(down_up)[:, :192].astype(int))
    assert error.mean() < 20  # the input face, resampled, not the synthesised one
    assert np.abs(out[:, :192].astype(int) - pred[:, :192].astype(int)).mean() > 60


FRAME_SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "4K": (3840, 2160)}
FACE_PLACES = ("top-left", "top-right", "centre", "bottom-left", "bottom-right")


@pytest.fixture(scope="module")
def tile_landmarks() -> np.ndarray:
    """dlib's 68 points of mediagen's 256 face tile, in tile coordinates."""
    frame = np.zeros((512, 512, 3), np.uint8)
    frame[128:384, 128:384] = face_image()
    track = track_faces([frame])
    assert track.found[0]
    return track.landmarks[0] - 128


def _tile_origin(place: str, width: int, height: int) -> tuple[int, int]:
    x = {"left": 0, "right": width - 256}.get(place.split("-")[-1], (width - 256) // 2)
    y = {"top": 0, "bottom": height - 256}.get(place.split("-")[0], (height - 256) // 2)
    return x, y


def _stand_in_networks():
    """E-Net returning its reference, GFPGAN its input, ParseNet labelling everything skin and keeping its
    inputs: the post-processing geometry with no network in the way."""
    parsed = []

    def enet(mel, img_batch, reference, noise):
        return reference, None

    def gfpgan(x, noise):
        return x

    def parsenet(x):
        parsed.append(x)
        logits = torch.zeros(len(x), 19, *x.shape[2:])
        logits[:, 1] = 1
        return logits, None

    return enet, gfpgan, parsenet, parsed


@pytest.mark.parametrize("place", FACE_PLACES)
@pytest.mark.parametrize("size", FRAME_SIZES)
def test_final_parse_crop_is_the_whole_frame_crop(tile_landmarks, size, place):
    """ParseNet's 512 crop in the final paste is GPEN's crop of the whole frame with the face area's result
    written into it, wherever the face is: no shifted face, no black ring (the face is small here, so most of
    the crop lies outside the work area)."""
    width, height = FRAME_SIZES[size]
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # context everywhere
    x0, y0 = _tile_origin(place, width, height)
    frame[y0 : y0 + 256, x0 : x0 + 256] = face_image()
    lm = tile_landmarks + [x0, y0]
    geometry = FaceGeometry.from_landmarks(lm[None], np.r_[lm.min(0), lm.max(0)][None], [True], width, height)
    area = steps.face_area(geometry.enet_boxes[0], width, height)
    enet, gfpgan, parsenet, parsed = _stand_in_networks()
    traced = {}
    render_faces(
        enet, gfpgan, parsenet, frame[None], geometry, np.zeros((1, 80, 16)),
        rng.integers(0, 256, (1, 384, 384, 3), dtype=np.uint8), [], [], [area], CPU,
        trace=lambda name, value: traced.setdefault(name, value),
    )  # fmt: skip
    crop = np.rint((parsed[-1][0].permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)
    whole = frame.copy()
    x1, y1, x2, y2 = area.box
    whole[y1:y2, x1:x2] = traced["pp"][0]
    expected, _ = steps.gpen_align(whole[None], geometry.paste_points)
    np.testing.assert_array_equal(crop, expected[0])
    assert not (area.size[0] >= 512 and area.size[1] >= 512)  # the area alone could not fill the crop


def test_faceless_frames_borrow_the_nearest_face_row():
    found = np.array([False, True, False, False, False, True, False])
    np.testing.assert_array_equal(nearest_found(found), [1, 1, 1, 1, 5, 5, 5])
    np.testing.assert_array_equal(nearest_found(np.array([False, True])), [1, 1])


# --- the whole engine with synthetic checkpoints ---------------------------------------------------------------

SHARED_RATES = {"face1": Fraction(1350, 61), "face2": Fraction(25)}  # ../shared/media, as documented
SHARED_FRAMES = 3  # two faces at most: a face costs seconds of CPU to prepare and to render
BLANK = 1  # in every clip, the frame without a face
FACE_MARGIN = 0.75  # the face region: the landmarks' box grown by this much of its size on every side


class Clip(NamedTuple):
    name: str
    path: Path  # a lossless clip
    folder: Path  # where its takes and cache go
    rate: Fraction  # the rate it was written at
    frames: np.ndarray  # its decoded frames
    track: FaceTrack  # of its frames


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    synth(folder)
    return folder


def _lossless_excerpt(source: Path, path: Path, rate: Fraction) -> Path:
    """The first frames of ``source``, the face of frame BLANK blacked out (its box doubled), lossless."""
    frames = media.read_frames(source, 0, SHARED_FRAMES)
    x1, y1, x2, y2 = track_faces(list(frames)).boxes[BLANK]
    w, h = x2 - x1, y2 - y1
    frames[BLANK, max(int(y1 - h / 2), 0) : int(y2 + h / 2), max(int(x1 - w / 2), 0) : int(x2 + w / 2)] = 0
    height, width = frames.shape[1:3]
    with media.VideoWriter(path, width=width, height=height, rate=rate, codec="lossless") as writer:
        writer.write(frames)
    return path


@pytest.fixture(
    scope="module",
    params=[
        "generated",
        pytest.param("face1", marks=pytest.mark.slow),
        pytest.param("face2", marks=pytest.mark.slow),
    ],
)
def clip(request, tmp_path_factory) -> Clip:
    """A lossless clip at its own exact rate: a generated face then a blank frame, or a shared clip's first
    frames with the face of the second blacked out."""
    folder = tmp_path_factory.mktemp(f"neural-{request.param}")
    if request.param == "generated":
        rate = RATE
        path = write_face_clip(
            folder / "clip.mkv", n_frames=2, rate=rate, codec="lossless", blank_frames=[BLANK]
        )
    else:  # needs ../shared: ask for the fixture (it skips when absent) only for these clips
        rate = SHARED_RATES[request.param]
        source = request.getfixturevalue("media_dir") / f"{request.param}.mp4"
        path = _lossless_excerpt(source, folder / "clip.mkv", rate)
    frames = _frames(path)
    return Clip(request.param, path, folder, rate, frames, track_faces(list(frames)))


def _request(clip: Clip, checkpoints, audio, name, **kwargs) -> RedubRequest:
    return RedubRequest(
        video=clip.path,
        audio=audio,
        output=clip.folder / name,
        engine="neural",
        codec="lossless",
        checkpoints=checkpoints,
        cache_dir=clip.folder / "cache",
        backend="torch",  # the engine's steps on torch; tests/test_backends.py covers OpenVINO
        **kwargs,
    )


def _frames(path) -> np.ndarray:
    return np.concatenate([c.frames for c in media.iter_frames(path)])


def _noise_wav(path, seconds: Fraction) -> Path:
    samples = np.random.default_rng(1).normal(0, 0.2, round(seconds * 16000)).astype(np.float32)
    soundfile.write(path, samples, 16000)
    return path


def _seconds(result: RedubResult) -> str:
    return f"{sum(result.stage_seconds.values()):.1f} s (prepare {result.stage_seconds['prepare']:.1f} s)"


def _assert_exact(result: RedubResult, clip: Clip, audio: Path, n_frames: int) -> None:
    """``n_frames`` frames at the clip's exact rate, and the new audio at 48 kHz cut or padded to end with them."""
    info = media.probe(result.output)
    duration = Fraction(n_frames) / clip.rate
    assert (info.frame_count, info.rate) == (n_frames, clip.rate)
    assert (result.frames, result.rate) == (n_frames, clip.rate)
    assert result.duration == info.duration == duration
    samples = round(duration * OUT_SR)
    expected = media.read_audio(audio, sample_rate=OUT_SR)[:samples]
    expected = np.concatenate([expected, np.zeros(samples - len(expected), expected.dtype)])
    got = media.read_audio(result.output, sample_rate=OUT_SR)
    assert len(got) == samples
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # 24-bit PCM in the file


def _assert_only_the_faces_changed(clip: Clip, output: Path) -> None:
    """Output frame i shows clip frame i: faceless ones bit for bit, the others outside the face region."""
    out = _frames(output)
    track = clip.track
    for source, rendered, found, lm in zip(clip.frames, out, track.found, track.landmarks, strict=False):
        changed = np.any(rendered != source, axis=2)
        if not found:
            assert not changed.any()  # a faceless frame passes through
            continue
        (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
        dx, dy = FACE_MARGIN * (x1 - x0), FACE_MARGIN * (y1 - y0)
        face_region = np.zeros_like(changed)
        face_region[max(int(y0 - dy), 0) : int(y1 + dy), max(int(x0 - dx), 0) : int(x1 + dx)] = True
        assert changed.any()  # the engine rendered the face
        assert not (changed & ~face_region).any()  # and nothing outside it


@pytest.fixture(scope="module")
def first_take(clip, checkpoints):
    """--fit video with the tone as long as the clip."""
    audio = write_tone(clip.folder / "line1.wav", len(clip.frames) / clip.rate)
    return redub(_request(clip, checkpoints, audio, "take1.mkv", seed=3)), audio


def test_first_take_is_exact_and_touches_only_the_faces(clip, first_take):
    result, audio = first_take
    assert result.engine == "neural"
    assert result.faceless_ranges == [(BLANK, BLANK + 1)]
    assert not {"coefficients", "references"} & set(result.cache_hits)
    _assert_exact(result, clip, audio, len(clip.frames))
    _assert_only_the_faces_changed(clip, result.output)


def test_second_take_fits_shorter_audio_from_the_prepared_video(clip, checkpoints, first_take, monkeypatch):
    """--fit audio with a line one and a half frames shorter than the clip: one frame fewer, a face rendered
    from the prepared references among them, and the video-only stages come from the first take's cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("a video-only stage ran although its output was cached")

    for stage in ("face3d_rows", "stabilize", "enhance_references"):
        monkeypatch.setattr(steps, stage, refuse)
    n_frames = len(clip.frames) - 1
    audio = _noise_wav(clip.folder / "line2.wav", (n_frames - Fraction(1, 2)) / clip.rate)
    result = redub(_request(clip, checkpoints, audio, "take2.mkv", seed=3, fit="audio"))
    print(f"{clip.name}: first take {_seconds(first_take[0])}, second take {_seconds(result)}")
    assert {"track", "coefficients", "references"} <= set(result.cache_hits)
    assert result.faceless_ranges == ([(BLANK, BLANK + 1)] if BLANK < n_frames else [])
    _assert_exact(result, clip, audio, n_frames)
    _assert_only_the_faces_changed(clip, result.output)


@pytest.mark.parametrize("clip", ["generated"], indirect=True)
def test_same_seed_renders_identical_frames(clip, checkpoints, first_take):
    """A re-render (prepare from the cache, models already loaded) equals the first take exactly."""
    first, audio = first_take
    again = redub(_request(clip, checkpoints, audio, "take3.mkv", seed=3))
    np.testing.assert_array_equal(_frames(again.output), _frames(first.output))


@pytest.mark.parametrize("clip", ["generated"], indirect=True)
def test_prepare_reports_progress_and_can_be_cancelled(clip, checkpoints):
    """The video-only stages report through the pipeline, so a cancel lands before the slow references."""
    seen: list[str] = []
    request = _request(clip, checkpoints, write_tone(clip.folder / "line4.wav", 0.08), "cancelled.mkv")
    request.cache_dir = clip.folder / "fresh-cache"  # nothing prepared yet
    with pytest.raises(CancelledError):
        redub(request, progress=lambda e: seen.append(e.stage), should_cancel=lambda: "coefficients" in seen)
    assert "coefficients" in seen and "references" not in seen
    assert not request.output.exists()

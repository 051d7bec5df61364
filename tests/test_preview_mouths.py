"""Exemplar mouths on real footage: the preview engine's output measured by the tracker (lip sync with the new
audio), by texture statistics of the inner mouth (close to the clip's own open mouths, far from the flat
synthesised cavity), by its frame-to-frame change (no more than the clip's own speech), and rendered the
same whatever the chunking; the index is cached with the track."""

from __future__ import annotations

import dataclasses
import sys
from fractions import Fraction

import cv2
import numpy as np
import pytest
from mediagen import face_image, write_face_clip, write_tone

from retalk import media
from retalk.cache import ArtifactCache
from retalk.engines import SourceClip, mouths
from retalk.engines.mouths import INNER_LIP, face_axes, inner_lip_gap
from retalk.engines.preview import (
    MAX_OPEN,
    MIN_REACH,
    PACE_WEIGHT,
    PreviewEngine,
    mouth_drive,
    pose_mouth,
    render_frame,
)
from retalk.pipeline import RedubRequest, redub
from retalk.tracking import DlibDetector, DlibLandmarks, Tracker, track_faces

SR = 16000


def loudness(wav: np.ndarray, rate: Fraction, n_frames: int) -> np.ndarray:
    """RMS of a 50 ms window at the middle of each frame's display time."""
    half = SR // 40
    centres = [round((i + Fraction(1, 2)) / rate * SR) for i in range(n_frames)]
    return np.array([np.sqrt(np.mean(wav[max(c - half, 0) : c + half] ** 2)) for c in centres])


def mouth_opening(lm: np.ndarray) -> float:
    """Inner-lip distance (61-67, 62-66, 63-65) over the eye distance: a size-free mouth opening."""
    return float(np.linalg.norm(lm[[67, 66, 65]] - lm[[61, 62, 63]], axis=1).mean() / face_axes(lm)[2])


def inner_mouth_pixels(frame: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (m, 3) inside the inner-lip polygon, and the gradient energy (squared Sobel magnitude of the
    grey image) at each of them."""
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(lm[INNER_LIP]).astype(np.int32)], 255)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))  # the lips' own edge is not inner-mouth texture
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = cv2.Sobel(grey, cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(grey, cv2.CV_32F, 0, 1) ** 2
    inside = mask > 0
    return frame[inside], energy[inside]


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    hist = cv2.calcHist([pixels[:, None, :]], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3)
    return hist / max(hist.sum(), 1)


def texture(frames, landmarks) -> tuple[float, np.ndarray]:
    """Mean gradient energy and the pooled colour histogram of the inner mouths of ``frames``."""
    pixels, energy = zip(
        *(inner_mouth_pixels(f, lm) for f, lm in zip(frames, landmarks, strict=True)), strict=True
    )
    return float(np.concatenate(energy).mean()), colour_histogram(np.concatenate(pixels))


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA))


def mouth_change(frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean absolute grey change between consecutive frames in a box around the mouth (per pair)."""
    grey = np.array([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames], np.float32)
    changes = []
    for i in range(1, len(frames)):
        cx, cy = landmarks[i][48:68].mean(0)
        half = 0.6 * face_axes(landmarks[i])[2]
        box = np.s_[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)]
        changes.append(np.abs(grey[i][box] - grey[i - 1][box]).mean())
    return np.array(changes)


def engine_for(path, track, end, cache=None, content_key="0" * 64):
    clip = SourceClip(path, media.probe(path), 0, end, content_key, track, cache, "cpu")
    engine = PreviewEngine()
    hits = engine.prepare(clip, lambda stage, done, total: None)
    return engine, hits


@pytest.fixture(scope="module", params=["face1.mp4", "face2.mp4"])
def redubbed(request, media_dir):
    """A shared clip re-dubbed with the shared speech (as long as both last) by the engine, and by the flat
    synthesis the engine had before exemplars, with the tracker's landmarks of every output frame."""
    path = media_dir / request.param
    info = media.probe(path)
    wav = media.read_audio(media_dir / "speech1.wav")
    n = min(info.frame_count, int(Fraction(len(wav), SR) * info.rate))
    frames = media.read_frames(path, 0, n)
    large_faces = Tracker(detector=DlibDetector(upsample=0))  # no up-sampling needed
    track = track_faces([frames], tracker=large_faces)
    assert track.found.all()
    wav = wav[: round(Fraction(n) / info.rate * SR)]
    engine, _ = engine_for(path, track, n)
    warnings = engine.listen(wav, info.rate, n)
    everything = np.arange(n)
    drive = mouth_drive(wav, info.rate, n)
    flat = np.array(
        [
            render_frame(f, lm, o, w)
            for f, lm, o, w in zip(frames, track.landmarks, drive.openness, drive.width, strict=True)
        ]
    )
    landmarks = DlibLandmarks()

    def retrack(images):
        return np.array(
            [landmarks.landmarks([f], box[None])[0] for f, box in zip(images, track.boxes, strict=True)]
        )

    out = engine.render_chunk(frames, everything, everything)
    return {
        "clip": request.param,
        "rate": info.rate,
        "wav": wav,
        "frames": frames,
        "track": track,
        "engine": engine,
        "warnings": warnings,
        "drive": drive,
        "out": out,
        "out_landmarks": retrack(out),
        "flat": flat,
        "flat_landmarks": retrack(flat),
    }


def test_output_mouth_follows_the_new_audio(redubbed):
    """The tracker measures the mouth opening on the rendered frames: it must follow the loudness of the new
    audio, far better than the original clip's mouth does (the baseline)."""
    n = len(redubbed["frames"])
    env = loudness(redubbed["wav"], redubbed["rate"], n)
    corr_out = np.corrcoef([mouth_opening(lm) for lm in redubbed["out_landmarks"]], env)[0, 1]
    corr_src = np.corrcoef([mouth_opening(lm) for lm in redubbed["track"].landmarks], env)[0, 1]
    corr_flat = np.corrcoef([mouth_opening(lm) for lm in redubbed["flat_landmarks"]], env)[0, 1]
    print(
        f"{redubbed['clip']}: {n} frames, output corr {corr_out:.3f}, original corr {corr_src:.3f}, "
        f"flat synthesis corr {corr_flat:.3f}"
    )
    assert corr_out >= 0.85
    assert corr_out > corr_src + 0.5


def test_open_mouths_have_the_clips_own_texture(redubbed):
    """Inside the open output mouths, gradient energy and colours are those of the clip's own open mouths,
    not those of the flat synthesised cavity."""
    track, open_target = redubbed["track"], redubbed["drive"].openness > 0.5
    eye = face_axes(track.landmarks)[2]
    source_open = inner_lip_gap(track.landmarks) / eye > 0.12
    assert open_target.sum() >= 10 and source_open.sum() >= 10
    own_energy, own_colours = texture(redubbed["frames"][source_open], track.landmarks[source_open])
    out_energy, out_colours = texture(redubbed["out"][open_target], redubbed["out_landmarks"][open_target])
    flat_energy, flat_colours = texture(
        redubbed["flat"][open_target], redubbed["flat_landmarks"][open_target]
    )
    out_distance = histogram_distance(out_colours, own_colours)
    flat_distance = histogram_distance(flat_colours, own_colours)
    print(
        f"{redubbed['clip']}: inner-mouth gradient energy clip {own_energy:.0f}, output {out_energy:.0f}, "
        f"flat {flat_energy:.0f}; colour histogram distance to the clip: output {out_distance:.3f}, "
        f"flat {flat_distance:.3f}"
    )
    assert abs(np.log(out_energy / own_energy)) < 0.5 * abs(np.log(flat_energy / own_energy))
    assert out_distance < 0.5 * flat_distance


def test_the_chosen_exemplars_add_no_flicker(redubbed, monkeypatch):
    """Frame-to-frame change in the mouth box: the person's own mouths change no more (2 % leeway) than the
    flat synthesis following the same motion, less than choosing each frame's best exemplar on its own
    (no cut costs), and no more than the clip's own speech."""
    engine, frames, track = redubbed["engine"], redubbed["frames"], redubbed["track"]
    plan, everything = engine.plan, np.arange(len(frames))
    for name in ("HOLD", "CUT", "CUT_PER_FRAME", "CUT_MAX"):
        monkeypatch.setattr(mouths, name, 0.0)
    greedy = dataclasses.replace(plan, exemplar=mouths.choose_mouths(engine.index, plan.targets))
    monkeypatch.setattr(engine, "plan", greedy)
    greedy_change = mouth_change(engine.render_chunk(frames, everything, everything), track.landmarks).mean()
    drive = plan.drive
    flat = [
        render_frame(f, lm, o, w, jaw=j)
        for f, lm, o, w, j in zip(
            frames, track.landmarks, drive.openness, drive.width, drive.jaw, strict=True
        )
    ]
    flat_change = mouth_change(np.array(flat), track.landmarks).mean()
    own = mouth_change(frames, track.landmarks).mean()
    out = mouth_change(redubbed["out"], track.landmarks).mean()
    steps = np.diff(engine.index.frames[plan.exemplar])
    print(
        f"{redubbed['clip']}: mean frame-to-frame change in the mouth box: output {out:.2f}, greedy choice "
        f"{greedy_change:.2f}, flat synthesis of the same motion {flat_change:.2f}, the clip's own speech "
        f"{own:.2f} (output / clip {out / own:.2f}); of {len(steps)} steps {np.count_nonzero(steps == 1)} play "
        f"forward, {np.count_nonzero(steps == 0)} hold, {np.count_nonzero((steps != 0) & (steps != 1))} cut"
    )
    assert out <= 1.02 * flat_change
    assert out < greedy_change
    assert out <= own


def test_the_mouth_moves_at_the_persons_pace_and_shows_their_widest_mouths(redubbed):
    """The posed opening's mean frame-to-frame change moves from the drive's toward the person's own in the clip
    (PACE_WEIGHT of the way, as a power of their ratio), while the exemplars are chosen for the opening at the
    full reach."""
    plan, index = redubbed["engine"].plan, redubbed["engine"].index
    own = np.abs(
        np.diff(inner_lip_gap(redubbed["track"].landmarks) / face_axes(redubbed["track"].landmarks)[2])
    )
    posed = np.abs(np.diff(plan.drive.openness * MAX_OPEN)).mean()
    asked = np.abs(np.diff(redubbed["drive"].openness * np.clip(index.reach, MIN_REACH, MAX_OPEN))).mean()
    print(
        f"{redubbed['clip']}: opening change per frame: posed {posed:.4f}, clip {index.pace:.4f}, drive {asked:.4f}"
    )
    assert index.pace == pytest.approx(own.mean())
    assert asked > 1.2 * index.pace
    assert posed == pytest.approx(asked * (index.pace / asked) ** PACE_WEIGHT)
    assert plan.targets[:, 0].max() > 1.2 * (plan.drive.openness.max() * MAX_OPEN)


def test_a_cut_between_exemplars_fades_in_over_two_frames(redubbed):
    """Right after a cut the new mouth lies at 1/3, then 2/3 over the one cut from; holds and forward play
    do not fade."""
    engine = redubbed["engine"]
    exemplar, frames = engine.plan.exemplar, engine.index.frames
    cuts = np.flatnonzero(~np.isin(np.diff(frames[exemplar]), (0, 1))) + 1
    assert len(cuts)
    for i in range(len(exemplar)):
        previous, opacity = engine._fading_from(i)
        if i in cuts:
            expected = (exemplar[i - 1], 1 / 3)
        elif i - 1 in cuts:
            expected = (exemplar[i - 2], 2 / 3)
        else:
            assert previous is None and opacity == 1.0
            continue
        assert np.array_equal(previous.patch, engine.index.patches[expected[0]]) and opacity == expected[1]


def test_the_report_says_how_often_the_clip_could_not_open_wide_enough(redubbed):
    n, synthesised = len(redubbed["frames"]), int(np.count_nonzero(redubbed["engine"].plan.synthesis))
    print(f"{redubbed['clip']}: inner mouth partly synthesised in {synthesised} of {n} frames")
    if synthesised:
        assert any(f" {synthesised} of {n} " in w for w in redubbed["warnings"])
    else:
        assert redubbed["warnings"] == []


def test_a_frame_renders_the_same_in_any_chunking_or_segment(redubbed):
    """Output frame i depends only on the request and i: rendered in other chunks, or as a segment by a fresh
    engine (as a render-farm worker does: prepare, listen to the whole line, render its range), it is the
    same bit for bit."""
    frames, track, out = redubbed["frames"], redubbed["track"], redubbed["out"]
    n = len(frames)
    engine = redubbed["engine"]
    for size in (1, 7, 16):
        for a in range(0, n, size):
            index = np.arange(a, min(a + size, n))
            assert np.array_equal(engine.render_chunk(frames[index], index, index), out[index]), (size, a)
    segment_engine, _ = engine_for(engine.clip.path, track, n)
    segment_engine.listen(redubbed["wav"], redubbed["rate"], n)
    backwards = np.arange(n - 1, n // 3, -1)  # a segment rendered in reverse order
    assert np.array_equal(
        segment_engine.render_chunk(frames[backwards], backwards, backwards), out[backwards]
    )


def test_a_redub_is_the_same_bit_for_bit_whatever_its_chunk_size(tmp_path, monkeypatch):
    video = write_face_clip(tmp_path / "shot.mkv", n_frames=20, size=(320, 240), codec="lossless")
    audio = write_tone(tmp_path / "line.wav", 0.8)
    outputs = []
    for chunk in (16, 3):
        monkeypatch.setattr(sys.modules["retalk.pipeline.redub"], "CHUNK_FRAMES", chunk)
        request = RedubRequest(
            video=video,
            audio=audio,
            output=tmp_path / f"out{chunk}.mkv",
            engine="preview",
            codec="lossless",
            cache_dir=tmp_path / "cache",
        )
        outputs.append(media.read_frames(redub(request).output, 0, 20))
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], media.read_frames(video, 0, 20))


def test_index_is_built_once_and_cached_with_the_track(tmp_path):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=12, size=(320, 240))
    track = track_faces(media.iter_frames(video))
    cache = ArtifactCache(tmp_path / "cache")
    first, hits = engine_for(video, track, 12, cache)
    assert hits == [] and len(first.index) == track.found.sum()
    second, hits = engine_for(video, track, 12, cache)
    assert hits == ["mouths"]
    for field in ("frames", "patches", "lips", "shapes", "doubt", "rest", "reach"):
        assert np.array_equal(getattr(first.index, field), getattr(second.index, field)), field
    # another track of the same pixels (e.g. another face chosen) is another index
    shifted = dataclasses.replace(track, landmarks=track.landmarks + 1.0)
    assert engine_for(video, shifted, 12, cache)[1] == []
    # a damaged entry is rebuilt, not trusted
    for entry in (tmp_path / "cache" / "mouths").iterdir():
        entry.write_bytes(b"not an npz")
    rebuilt, hits = engine_for(video, track, 12, cache)
    assert hits == [] and np.array_equal(rebuilt.index.patches, first.index.patches)
    assert engine_for(video, track, 12, cache)[1] == ["mouths"]


def test_a_clip_that_never_opens_its_mouth_falls_back_to_synthesis_and_says_so(tmp_path):
    """A shot whose mouth stays closed (the sample face with its smile closed by the engine's own pose): loud
    frames get the synthesised cavity, and the warning counts them."""
    face = np.ascontiguousarray(np.pad(face_image(), ((64, 64), (64, 64), (0, 0)), mode="edge"))
    closed = render_frame(face, track_faces([face]).landmarks[0], 0.0, 0.0)
    video = tmp_path / "closed.mkv"
    with media.VideoWriter(
        video, width=closed.shape[1], height=closed.shape[0], rate=Fraction(25), codec="lossless"
    ) as writer:
        writer.write(np.repeat(closed[None], 25, axis=0))
    track = track_faces(media.iter_frames(video))
    engine, _ = engine_for(video, track, 25)
    assert engine.index.shapes[:, 0].max() < 0.02
    warnings = engine.listen(media.read_audio(write_tone(tmp_path / "line.wav", 1.0)), Fraction(25), 25)
    plan = engine.plan
    loud = plan.drive.openness > 0.5 * plan.drive.openness.max()
    assert loud.any() and (plan.synthesis[loud] == 1).all()
    synthesised = np.count_nonzero(plan.synthesis)
    assert warnings == [
        f"exemplar mouths: the clip's own mouth never opens as wide as {synthesised} of 25 output frames "
        f"({synthesised / 25:.0%}) need; their inner mouth is partly synthesised"
    ]
    # the synthesised cavity is there: the inner mouth of the loudest frame is far darker than the stretched
    # closed exemplar alone would show
    i = np.array([np.argmax(plan.drive.openness)])
    posed = pose_mouth(track.landmarks[i[0]], plan.drive.openness[i[0]], plan.drive.width[i[0]])
    cavity = inner_mouth_pixels(engine.render_chunk(media.read_frames(video, i[0], i[0] + 1), i, i)[0], posed)
    engine.plan = dataclasses.replace(plan, synthesis=np.zeros(25))
    stretched = inner_mouth_pixels(
        engine.render_chunk(media.read_frames(video, i[0], i[0] + 1), i, i)[0], posed
    )
    assert cavity[0].mean() < 0.75 * stretched[0].mean()


@pytest.mark.filterwarnings("error")
def test_a_clip_without_any_face_indexes_and_plans_without_warnings(tmp_path):
    """No face anywhere: an empty index, a plan that shows no exemplar, frames returned unchanged, and no
    numeric warning on the way (no eyes to measure a mouth by)."""
    video = tmp_path / "wall.mkv"
    wall = np.full((10, 48, 64, 3), 90, np.uint8)
    with media.VideoWriter(video, width=64, height=48, rate=Fraction(25), codec="lossless") as writer:
        writer.write(wall)
    track = track_faces(media.iter_frames(video))
    assert not track.found.any()
    engine, _ = engine_for(video, track, 10)
    assert len(engine.index) == 0
    assert engine.listen(media.read_audio(write_tone(tmp_path / "line.wav", 0.4)), Fraction(25), 10) == []
    assert (engine.plan.exemplar == -1).all() and not engine.plan.synthesis.any()
    everything = np.arange(10)
    assert np.array_equal(engine.render_chunk(wall, everything, everything), wall)

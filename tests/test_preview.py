"""The preview engine: audio-driven mouth parameters, the landmark pose, the warp, and lip sync measured
on real footage with the tracker."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from mediagen import face_image

from retalk import media
from retalk.pipeline.preview import inner_lip_gap, mouth_drive, pose_mouth, render_frame
from retalk.tracking import DlibDetector, DlibLandmarks, Tracker, track_faces

SR = 16000
RATE = Fraction(25)


def eye_distance(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))


def mouth_opening(lm: np.ndarray) -> float:
    """Inner-lip distance (61-67, 62-66, 63-65) over the eye distance: a size-free mouth opening."""
    return float(np.linalg.norm(lm[[67, 66, 65]] - lm[[61, 62, 63]], axis=1).mean() / eye_distance(lm))


def loudness(wav: np.ndarray, rate: Fraction, n_frames: int) -> np.ndarray:
    """RMS of a 50 ms window at the middle of each frame's display time."""
    half = SR // 40
    centres = [round((i + Fraction(1, 2)) / rate * SR) for i in range(n_frames)]
    return np.array([np.sqrt(np.mean(wav[max(c - half, 0) : c + half] ** 2)) for c in centres])


@pytest.fixture(scope="module")
def still_face():
    """The astronaut photo and its tracked 68 points."""
    face = np.ascontiguousarray(np.pad(face_image(), ((64, 64), (64, 64), (0, 0)), mode="edge"))
    track = track_faces([face])
    assert track.found.all()
    return face, track.landmarks[0]


def test_openness_follows_loudness_and_silence_closes_the_mouth():
    t = np.arange(2 * SR) / SR
    envelope = np.clip(np.sin(2 * np.pi * 1.5 * t), 0, None)  # bursts and silent gaps
    wav = (0.3 * envelope * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    drive = mouth_drive(wav, RATE, 50)
    assert np.corrcoef(drive.openness, loudness(wav, RATE, 50))[0, 1] > 0.9
    assert drive.openness.max() > 0.8 and drive.openness.min() < 0.05
    silent = mouth_drive(np.zeros(SR, np.float32), RATE, 25)
    assert not silent.openness.any() and not silent.width.any()


def test_a_low_spectrum_rounds_the_mouth_and_a_high_one_spreads_it():
    t = np.arange(2 * SR) / SR
    low = sum(np.sin(2 * np.pi * f * t) for f in (150, 300, 450))  # "oo": energy low in the spectrum
    high = sum(np.sin(2 * np.pi * f * t) for f in (150, 2300, 2900))  # "ee": a strong high formant
    wav = (0.1 * np.where(t < 1, low, high)).astype(np.float32)
    width = mouth_drive(wav, RATE, 50).width
    assert width[5:22].mean() < -0.3 and width[30:47].mean() > 0.3


def test_pose_closes_the_old_mouth_then_opens_the_new_one(still_face):
    _, lm = still_face
    iod = eye_distance(lm)
    gaps = [inner_lip_gap(pose_mouth(lm, o, 0.0)) / iod for o in (0.0, 0.5, 1.0)]
    assert gaps[0] < 0.02 and gaps[0] < gaps[1] < gaps[2] and gaps[2] > 0.2
    posed = pose_mouth(lm, 1.0, 0.0)
    assert np.array_equal(posed[17:48], lm[17:48])  # brows, nose and eyes stay
    assert posed[8, 1] > lm[8, 1] + 0.1 * iod  # the chin drops with the jaw
    width = [np.ptp(pose_mouth(lm, 0.5, w)[48:60, 0]) for w in (-1.0, 0.0, 1.0)]
    assert width[0] < width[1] < width[2]


def test_only_the_lower_face_changes(still_face):
    face, lm = still_face
    out = render_frame(face, lm, 1.0, 0.5)
    changed = np.any(out != face, axis=-1)
    ys, xs = np.nonzero(changed)
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    w, h = x1 - x0, y1 - y0
    assert changed.sum() > 0.1 * w * h  # a visible change...
    assert xs.min() >= x0 - 0.5 * w and xs.max() <= x1 + 0.5 * w  # ...inside a margin around the face
    assert ys.min() >= lm[27:36, 1].min() and ys.max() <= y1 + 0.5 * h  # and below the nose bridge
    mouth = lm[48:68].mean(0).astype(int)
    assert changed[mouth[1], mouth[0]]


@pytest.mark.parametrize("clip", ["face1.mp4", "face2.mp4"])
def test_output_mouth_follows_the_new_audio(media_dir, clip):
    """The tracker measures the mouth opening on the rendered frames: it must follow the loudness of the new
    audio, far better than the original clip's mouth does (the baseline)."""
    n = 48
    path = media_dir / clip
    rate = media.probe(path).rate
    frames = media.read_frames(path, 0, n)
    large_faces = Tracker(detector=DlibDetector(upsample=0))  # no up-sampling needed
    track = track_faces([frames], tracker=large_faces)
    assert track.found.all()
    wav = media.read_audio(media_dir / "speech1.wav", duration=Fraction(n) / rate)
    drive = mouth_drive(wav, rate, n)
    out = [
        render_frame(f, lm, o, w)
        for f, lm, o, w in zip(frames, track.landmarks, drive.openness, drive.width, strict=True)
    ]

    landmarks = DlibLandmarks()
    rendered = [landmarks.landmarks([f], box[None])[0] for f, box in zip(out, track.boxes, strict=True)]
    env = loudness(wav, rate, n)
    corr_out = np.corrcoef([mouth_opening(lm) for lm in rendered], env)[0, 1]
    corr_src = np.corrcoef([mouth_opening(lm) for lm in track.landmarks], env)[0, 1]
    print(f"{clip}: output corr {corr_out:.3f}, original corr {corr_src:.3f}")
    assert corr_out > 0.7
    assert corr_out > corr_src + 0.5

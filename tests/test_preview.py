"""The preview engine: audio-driven mouth parameters, the landmark pose, the warp, and the choice of
exemplar mouths (on real footage: tests/test_preview_mouths.py)."""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest
from mediagen import face_image

from retalk.engines import mouths
from retalk.engines.mouths import MouthIndex, choose_mouths, inner_lip_gap, select_exemplars
from retalk.engines.preview import mouth_drive, pose_mouth, render_frame
from retalk.tracking import track_faces

SR = 16000
RATE = Fraction(25)


def eye_distance(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))


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


def test_the_width_changes_over_a_syllable_without_lagging_the_sound():
    """From "oo" to "ee" at 1 s: the width passes its midpoint at the switch (smoothed both ways, no lag) and
    takes a few frames to get there, rather than jumping in one."""
    t = np.arange(2 * SR) / SR
    low = sum(np.sin(2 * np.pi * f * t) for f in (150, 300, 450))
    high = sum(np.sin(2 * np.pi * f * t) for f in (150, 2300, 2900))
    width = mouth_drive((0.1 * np.where(t < 1, low, high)).astype(np.float32), RATE, 50).width
    middle = (width[5:20].mean() + width[30:45].mean()) / 2
    crossing = np.flatnonzero(np.diff(np.sign(width - middle)))
    assert len(crossing) == 1 and abs(crossing[0] + 0.5 - 25) <= 1  # frame 25 starts at 1 s
    assert np.abs(np.diff(width)).max() < 0.3 * (width[30:45].mean() - width[5:20].mean())


def test_the_jaw_follows_a_smoother_opening_than_the_lips_without_lagging_them():
    """Syllables at 4 Hz: the openness and, smoother still, the jaw's opening move less from frame to frame
    than the loudness does, and neither lags it (smoothed both ways)."""
    t = np.arange(2 * SR) / SR
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    wav = (0.3 * envelope * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    drive, env = mouth_drive(wav, RATE, 50), loudness(wav, RATE, 50)
    env = env / np.percentile(env, 95)

    def speed(x):
        return np.abs(np.diff(x)).mean()

    assert speed(drive.jaw) < 0.8 * speed(drive.openness) < 0.8 * speed(env)
    for opening in (drive.openness, drive.jaw):
        lagged = [np.corrcoef(opening[5 + lag : 45 + lag], env[5:45])[0, 1] for lag in (-1, 0, 1)]
        assert np.argmax(lagged) == 1 and lagged[1] > 0.8


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
    # the jaw line follows its own opening, the lips theirs
    closed_jaw = pose_mouth(lm, 1.0, 0.0, jaw=0.0)
    assert np.allclose(closed_jaw[:17], pose_mouth(lm, 0.0, 0.0)[:17])
    assert np.array_equal(closed_jaw[17:], posed[17:])


def own_mouth(face: np.ndarray, lm: np.ndarray) -> mouths.Mouth:
    """The face's own mouth as an exemplar: what a mouth index holds for this frame."""
    patch = cv2.warpAffine(face, mouths.patch_transform(lm), mouths.PATCH_SIZE, flags=cv2.INTER_LINEAR)
    return mouths.Mouth(patch, mouths.to_patch(lm[None])[0, mouths.LIPS])


@pytest.mark.parametrize("exemplar", [False, True])
def test_only_the_lower_face_changes(still_face, exemplar):
    face, lm = still_face
    mouth = own_mouth(face, lm) if exemplar else None
    out = render_frame(face, lm, 1.0, 0.5, mouth=mouth)
    changed = np.any(out != face, axis=-1)
    ys, xs = np.nonzero(changed)
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    w, h = x1 - x0, y1 - y0
    assert changed.sum() > 0.1 * w * h  # a visible change...
    assert xs.min() >= x0 - 0.5 * w and xs.max() <= x1 + 0.5 * w  # ...inside a margin around the face
    assert ys.min() >= lm[27:36, 1].min() and ys.max() <= y1 + 0.5 * h  # and below the nose bridge
    mouth_centre = lm[48:68].mean(0).astype(int)
    assert changed[mouth_centre[1], mouth_centre[0]]


def test_an_exemplar_mouth_keeps_the_colour_of_the_face_it_is_pasted_on(still_face):
    """The face's own mouth, brightened by a third, pasted back: colour matching to the skin around the lips
    undoes the change."""
    face, lm = still_face
    mouth = own_mouth(face, lm)
    brighter = mouths.Mouth(np.clip(mouth.patch * 1.3, 0, 255).astype(np.uint8), mouth.lips)
    plain = render_frame(face, lm, 0.0, 0.0, mouth=mouth)
    matched = render_frame(face, lm, 0.0, 0.0, mouth=brighter)
    lips = np.zeros(face.shape[:2], np.uint8)
    cv2.fillPoly(lips, [np.round(lm[48:60]).astype(np.int32)], 1)
    lips = lips > 0
    shift = matched[lips].astype(float).mean(0) - plain[lips].astype(float).mean(0)
    assert np.abs(shift).max() < 0.05 * plain[lips].mean()  # without matching: +30 %


def test_the_face_moves_with_the_opening_as_the_person_moves_it(still_face):
    """A clip whose jaw drops half of each opening and whose upper lip rises a fifth of it teaches exactly that,
    and the pose follows it; a mouth that hardly moves teaches nothing (the default motion)."""
    _, lm = still_face
    _, uy, eye = mouths.face_axes(lm)
    openings = np.linspace(0.0, 0.2, 30) * eye  # pixels
    faces = np.repeat(lm[None].astype(np.float64), 30, axis=0)
    lower, upper = [56, 57, 58, 65, 66, 67], [50, 51, 52, 61, 62, 63]
    faces[:, lower] += (0.8 * openings)[:, None, None] * uy
    faces[:, upper] -= (0.2 * openings)[:, None, None] * uy
    faces[:, 8] += (0.5 * openings)[:, None] * uy
    motion = mouths.opening_motion(faces)
    assert motion[8] == pytest.approx(0.5, abs=0.02)
    assert motion[62] == pytest.approx(-0.2, abs=0.02) and motion[66] == pytest.approx(0.8, abs=0.02)
    assert not motion[17:48].any()  # brows, nose and eyes never move
    posed, default = pose_mouth(lm, 1.0, 0.0, motion), pose_mouth(lm, 1.0, 0.0)
    drop = (posed[8] - lm[8]) @ uy / ((posed[66] - posed[62]) @ uy - (lm[66] - lm[62]) @ uy)
    assert drop == pytest.approx(0.5, abs=0.05)
    assert (posed[8] - lm[8]) @ uy < 0.7 * (
        (default[8] - lm[8]) @ uy
    )  # the default drops the chin all the way
    still = (
        np.repeat(lm[None].astype(np.float64), 30, axis=0) + np.linspace(0, 0.005, 30)[:, None, None] * eye
    )
    assert mouths.opening_motion(still) is mouths.DEFAULT_MOTION


def _index(frames, openings, doubt=None):
    """An index of exemplars at source ``frames`` with these openings (no pixels needed for the choice)."""
    k = len(frames)
    shapes = np.c_[openings, np.full(k, 0.9), np.full(k, 0.3)]
    return MouthIndex(
        np.asarray(frames),
        np.zeros((k, 1, 1, 3), np.uint8),
        np.zeros((k, 20, 2)),
        shapes,
        np.zeros(k) if doubt is None else np.asarray(doubt),
        np.zeros((68, 2)),
        0.2,
        0.0,
        mouths.DEFAULT_MOTION,
    )


def test_the_choice_matches_the_target_shapes():
    index = _index(np.arange(0, 100, 10), np.linspace(0.0, 0.27, 10))  # far apart: every switch is a cut
    wanted = np.array([0, 9, 3, 3, 3, 3, 7, 1])
    targets = index.shapes[wanted]
    assert np.array_equal(choose_mouths(index, targets), wanted)


def test_the_choice_plays_the_source_forward_rather_than_flickering():
    """Targets that wobble around the openings of a run of consecutive source frames: the choice plays the
    run (free) instead of cutting to the exemplar that matches each wobble best, which a per-frame choice
    would do."""
    run = np.linspace(0.05, 0.2, 12)
    frames = np.r_[np.arange(100, 112), np.arange(300, 312)]
    openings = np.r_[run, run + 0.004]
    index = _index(frames, openings)
    wobble = np.where(np.arange(12) % 2, 0.004, 0.0)
    choice = choose_mouths(index, np.c_[run + wobble, np.full(12, 0.9), np.full(12, 0.3)])
    assert np.array_equal(np.diff(index.frames[choice]), np.ones(11)), index.frames[choice]
    greedy = np.argmin(np.abs(openings[None] - (run + wobble)[:, None]), axis=1)
    assert np.count_nonzero(np.diff(index.frames[greedy]) != 1) > 5  # the per-frame best flickers


def test_nearby_source_frames_are_cheaper_to_cut_to_than_distant_ones():
    # from exemplar 0 (frame 0) the target moves to a shape that frame 500 matches a little better than 5
    index = _index([0, 5, 500], [0.0, 0.198, 0.2])
    targets = np.c_[[0.0, 0.0, 0.2, 0.2], np.full(4, 0.9), np.full(4, 0.3)]
    assert list(choose_mouths(index, targets)) == [0, 0, 1, 1]


def test_the_choice_avoids_an_exemplar_whose_opening_is_in_doubt():
    # frames 0 and 500 both measure 0.2 open, but the landmark model placed frame 0's lips two ways
    index = _index([0, 500], [0.2, 0.2], doubt=[0.03, 0.0])
    assert list(choose_mouths(index, np.tile([0.2, 0.9, 0.3], (3, 1)))) == [1, 1, 1]


def test_the_choice_of_a_long_line_is_solved_in_blocks_that_continue(monkeypatch):
    """Blocks bound the memory of a long line; each continues from where the previous one ended, so a target
    that stays on one shape keeps playing across the block boundary."""
    monkeypatch.setattr(mouths, "BLOCK", 16)
    index = _index(np.arange(60), np.full(60, 0.1))
    choice = choose_mouths(index, np.tile([0.1, 0.9, 0.3], (50, 1)))
    assert np.array_equal(np.diff(choice), np.ones(49))  # plays forward, through blocks at 16, 32, 48
    assert np.array_equal(choose_mouths(_index([], []), np.zeros((3, 3))), [-1, -1, -1])


def test_a_long_clip_keeps_a_bounded_index_of_runs_with_its_widest_mouths():
    rng = np.random.default_rng(0)
    found = rng.random(20000) > 0.1
    openings = rng.random(20000) * 0.2
    openings[12345] = 0.35  # the one wide-open frame
    found[12345] = True
    kept = select_exemplars(found, openings)
    assert len(kept) <= mouths.MAX_EXEMPLARS and found[kept].all()
    assert np.all(np.diff(kept) > 0) and 12345 in kept
    runs = kept.reshape(-1, mouths.RUN)  # runs of RUN consecutive frames with a face
    assert np.array_equal(runs, np.flatnonzero(found)[np.searchsorted(np.flatnonzero(found), runs)])
    assert kept.max() - kept.min() > 15000  # spread over the whole clip
    short = np.ones(300, bool)
    assert np.array_equal(select_exemplars(short, np.zeros(300)), np.arange(300))

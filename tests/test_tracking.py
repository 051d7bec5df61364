"""Face tracking: the selection/identity rules on scripted detections, following the face between key frames on
painted faces, the reference's S3FD and FAN behind the tracker, the detector choice of a re-dub, then dlib on real
faces."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mediagen import face_image, write_face_clip

import retalk.tracking as tracking
from retalk.errors import CheckpointError, InputError
from retalk.media import iter_frames
from retalk.tracking import DlibLandmarks, FaceSelector, FaceTrack, Tracker, track_faces

# --- scripted detections: the selection and identity rules, exactly -------------------------------------

FRAME = np.zeros((240, 320, 3), np.uint8)


class ScriptedDetector:
    """Returns the listed (k, 5) boxes for frame i; remembers the frame sizes it was given."""

    identity = "scripted"

    def __init__(self, per_frame: list[list[tuple[float, float, float, float]]]) -> None:
        self.per_frame = per_frame
        self.calls = 0
        self.sizes: list[tuple[int, int]] = []

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        found = []
        for frame in frames_rgb:
            self.sizes.append(frame.shape[:2])
            found.append(np.array([[*b, 1.0] for b in self.per_frame[self.calls]]).reshape(-1, 5))
            self.calls += 1
        return found


class BoxLandmarks:
    """68 points on a fixed pattern inside each box, so landmarks follow boxes exactly."""

    identity = "box-pattern"
    pattern = np.random.default_rng(0).uniform(0.1, 0.9, (68, 2))

    def landmarks(self, frames_rgb, boxes: np.ndarray) -> np.ndarray:
        assert len(frames_rgb) == len(boxes)
        boxes = np.asarray(boxes)
        return boxes[:, None, :2] + self.pattern[None] * (boxes[:, None, 2:4] - boxes[:, None, :2])


def scripted_tracker(per_frame, **settings) -> Tracker:
    settings = {"detect_face_size": None, "key_interval": None, **settings}
    return Tracker(detector=ScriptedDetector(per_frame), landmarker=BoxLandmarks(), **settings)


def scripted(per_frame, select="largest", **settings) -> FaceTrack:
    frames = [FRAME] * len(per_frame)
    return track_faces(frames, select=select, tracker=scripted_tracker(per_frame, **settings))


LEFT = (20.0, 60.0, 80.0, 120.0)  # 60 px
RIGHT = (200.0, 50.0, 290.0, 140.0)  # 90 px


def shifted(box, dx=0.0, dy=0.0, grow=0.0):
    x1, y1, x2, y2 = box
    return (x1 + dx - grow, y1 + dy - grow, x2 + dx + grow, y2 + dy + grow)


def test_largest_is_chosen_once_and_then_followed():
    # The left face grows past the right one: the track must stay on the person chosen first.
    frames = [[LEFT, RIGHT]] + [[shifted(LEFT, grow=10 * i), shifted(RIGHT, dx=2 * i)] for i in range(1, 6)]
    track = scripted(frames, smooth_window=None)
    assert track.found.all()
    np.testing.assert_allclose(track.boxes, [shifted(RIGHT, dx=2 * i) for i in range(6)])


def test_raw_boxes_and_landmarks_are_the_models_own_before_smoothing_and_gap_filling():
    # Consumers that follow the reference's own box rule (pads, a 5-frame mean) start from these boxes, not from
    # the Savitzky-Golay-smoothed ones; the preview's mouth index measures lips by the raw points.
    wobble = [shifted(LEFT, dx=3.0 * (-1) ** i) for i in range(10)]
    track = scripted([[b] for b in wobble[:8]] + [[]] + [[b] for b in wobble[9:]])
    raw = np.array(wobble)
    raw[8] = np.nan
    np.testing.assert_array_equal(track.raw_boxes, raw)
    assert not np.allclose(track.boxes[:8], raw[:8])  # the smoothed ones differ
    assert np.isfinite(track.boxes).all()
    points = BoxLandmarks().landmarks([FRAME] * 10, raw)
    np.testing.assert_array_equal(track.raw_landmarks, points)  # NaN on frame 8 too
    assert not np.allclose(track.landmarks[:8], points[:8])


@pytest.mark.parametrize(("select", "expected"), [(0, LEFT), (1, RIGHT), ("1", RIGHT), ("0", LEFT)])
def test_index_counts_faces_left_to_right(select, expected):
    track = scripted(
        [[RIGHT, LEFT]] * 3, select=select, smooth_window=None
    )  # detector lists them right first
    np.testing.assert_allclose(track.boxes, [expected] * 3)


@pytest.mark.parametrize(
    ("select", "expected"), [((250, 100), RIGHT), ("30,70", LEFT), ((130, 90), LEFT), ((199, 300), RIGHT)]
)
def test_point_picks_the_face_containing_or_nearest_it(select, expected):
    track = scripted([[LEFT, RIGHT]] * 2, select=select, smooth_window=None)
    np.testing.assert_allclose(track.boxes, [expected] * 2)


def test_index_beyond_the_faces_is_an_input_error():
    with pytest.raises(InputError, match="face index 2: frame 1, the first with faces, has 2"):
        scripted([[], [LEFT, RIGHT]], select=2)


@pytest.mark.parametrize("select", ["biggest", "1,2,3", (1.0,), -1, True, "a,b"])
def test_bad_selection_is_an_input_error(select):
    with pytest.raises(InputError, match="face"):
        FaceSelector(select)


def test_never_jumps_to_another_face_when_the_person_vanishes():
    frames = [[LEFT, RIGHT]] * 3 + [[LEFT]] * 4 + [[LEFT, shifted(RIGHT, dx=-6)]] * 2
    track = scripted(frames, select=1, smooth_window=None)
    assert track.found.tolist() == [True] * 3 + [False] * 4 + [True] * 2
    assert track.faceless_ranges() == [(3, 7)]
    np.testing.assert_allclose(track.boxes[7:], [shifted(RIGHT, dx=-6)] * 2)


def test_a_single_face_is_found_again_after_a_gap_even_if_it_moved():
    frames = [[LEFT]] * 2 + [[]] * 3 + [[shifted(LEFT, dx=45, dy=20)]] * 2
    track = scripted(frames, smooth_window=None)
    assert track.faceless_ranges() == [(2, 5)]
    np.testing.assert_allclose(track.boxes[5:], [shifted(LEFT, dx=45, dy=20)] * 2)


def test_faceless_frames_are_interpolated_between_their_neighbours():
    frames = [[LEFT], [], [], [shifted(LEFT, dx=30)]]
    track = scripted(frames, smooth_window=None)
    np.testing.assert_allclose(track.boxes[1], shifted(LEFT, dx=10))
    np.testing.assert_allclose(track.boxes[2], shifted(LEFT, dx=20))
    np.testing.assert_allclose(
        track.landmarks[1], BoxLandmarks().landmarks([FRAME], np.array([shifted(LEFT, dx=10)]))[0]
    )
    assert track.found.tolist() == [True, False, False, True]


def test_no_face_anywhere_and_empty_streams():
    track = scripted([[]] * 4)
    assert not track.found.any() and track.faceless_ranges() == [(0, 4)]
    assert np.isfinite(track.boxes).all() and np.isfinite(track.landmarks).all()
    empty = scripted([])
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.landmarks.shape == (0, 68, 2)


def test_smoothing_reduces_jitter_without_bias():
    rng = np.random.default_rng(5)
    truth = np.array([shifted(RIGHT, dx=1.5 * i) for i in range(40)])
    noisy = truth + rng.normal(0, 2.0, truth.shape)
    raw = scripted([[tuple(b)] for b in noisy], smooth_window=None)
    smooth = scripted([[tuple(b)] for b in noisy], smooth_window=7)
    raw_err = np.abs(raw.boxes - truth).mean()
    smooth_err = np.abs(smooth.boxes - truth).mean()
    assert smooth_err < 0.75 * raw_err
    assert abs((smooth.boxes - truth).mean()) < 0.3


def test_short_runs_are_smoothed_with_a_shorter_window_or_kept():
    boxes = [[shifted(LEFT, dx=d)] for d in (0, 3, 1)] + [[]] + [[shifted(LEFT, dx=2)]]
    track = scripted(boxes, smooth_window=7)
    assert track.found.tolist() == [True, True, True, False, True]
    np.testing.assert_allclose(track.boxes[4], shifted(LEFT, dx=2))  # a run of 1 is left as detected
    # a quadratic fit through 3 points is exact: the run is unchanged
    np.testing.assert_allclose(track.boxes[:3], [shifted(LEFT, dx=d) for d in (0, 3, 1)], atol=1e-9)


@pytest.mark.parametrize(
    ("length", "window", "order"), [(250, 7, 2), (7, 7, 2), (6, 7, 2), (40, 9, 3), (3, 3, 2)]
)
def test_smoothing_is_scipys_savitzky_golay_filter(length, window, order):
    from scipy.signal import savgol_filter

    points = np.random.default_rng(length).normal(300.0, 50.0, (length, 68, 2))
    found = np.ones(length, bool)
    short = min(window, length if length % 2 else length - 1)  # the window a short run shrinks to
    np.testing.assert_allclose(
        tracking._smooth_runs(points, found, window, order),
        savgol_filter(points, short, order, axis=0),
        atol=1e-9,
    )


def test_accepts_chunks_batches_and_single_frames_and_reports_progress():
    per_frame = [[shifted(RIGHT, dx=i)] for i in range(5)]
    stack = np.stack([FRAME] * 5)
    done: list[int] = []
    as_chunks = track_faces(
        [SimpleNamespace(start=0, frames=stack[:3]), SimpleNamespace(start=3, frames=stack[3:])],
        tracker=scripted_tracker(per_frame),
        progress=done.append,
    )
    as_batch = track_faces([stack], tracker=scripted_tracker(per_frame))
    as_frames = track_faces(list(stack), tracker=scripted_tracker(per_frame))
    assert done == [1, 2, 3, 4, 5]
    for other in (as_batch, as_frames):
        np.testing.assert_array_equal(other.boxes, as_chunks.boxes)
        np.testing.assert_array_equal(other.landmarks, as_chunks.landmarks)


def test_every_frame_detection_sees_whole_batches():
    per_frame = [[shifted(RIGHT, dx=i)] for i in range(6)]
    tracker = scripted_tracker(per_frame)
    calls: list[int] = []
    detect = tracker.detector.detect
    tracker.detector.detect = lambda frames: calls.append(len(frames)) or detect(frames)
    track_faces([np.stack([FRAME] * 4), np.stack([FRAME] * 2)], tracker=tracker)
    assert calls == [4, 2]


def test_detection_runs_at_the_tracked_face_scale():
    big = (100.0, 100.0, 420.0, 420.0)  # a 320-px face
    frame = np.zeros((600, 800, 3), np.uint8)
    tracker = scripted_tracker(
        [[big]] + [[(50.0, 50.0, 210.0, 210.0)]] * 2, detect_face_size=160
    )  # half scale
    track = track_faces([frame] * 3, tracker=tracker)
    assert tracker.detector.sizes == [(600, 800), (300, 400), (300, 400)]
    np.testing.assert_allclose(track.raw_boxes, [big] * 3)  # mapped back to frame pixels


def test_bad_frames_are_input_errors():
    with pytest.raises(InputError, match="uint8"):
        track_faces([np.zeros((8, 8, 3), np.float32)], tracker=scripted_tracker([[]]))
    with pytest.raises(InputError, match="frames"):
        track_faces([np.zeros((2, 2, 8, 8, 3), np.uint8)], tracker=scripted_tracker([[]]))


def test_save_and_load_round_trip(tmp_path: Path):
    track = scripted([[LEFT], [], [shifted(LEFT, dx=4)]])
    track.save(tmp_path / "track.npz")
    loaded = FaceTrack.load(tmp_path / "track.npz")
    for name in ("boxes", "landmarks", "found", "raw_boxes", "raw_landmarks"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(track, name))
    assert loaded.faceless_ranges() == [(1, 2)]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a face track file"):
        FaceTrack.load(tmp_path / "junk.npz")


def test_shape_predictor_missing_or_corrupt_is_a_checkpoint_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tracking, "search_dirs", lambda checkpoints_dir=None: [tmp_path])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="shape_predictor_68_face_landmarks.dat not found"):
        DlibLandmarks()
    (tmp_path / tracking.DLIB_LANDMARKS).write_bytes(b"\0" * 1000)
    landmarks = DlibLandmarks(checkpoints_dir=tmp_path)  # found: read on first use
    with pytest.raises(CheckpointError, match="not a dlib shape predictor"):
        landmarks.landmarks([FRAME], np.array([[10.0, 10.0, 50.0, 50.0]]))


# --- dlib on real faces ---------------------------------------------------------------------------------


def _check_plausible_faces(track: FaceTrack) -> None:
    """Landmarks near the box, eyes above the nose above the mouth, a sensible eye distance."""
    lm, boxes = track.landmarks[track.found], track.boxes[track.found]
    size = (boxes[:, 2:] - boxes[:, :2]).mean(axis=1)
    margin = 0.25 * size[:, None]
    assert (lm[..., 0] >= boxes[:, :1] - margin).all() and (lm[..., 0] <= boxes[:, 2:3] + margin).all()
    assert (lm[..., 1] >= boxes[:, 1:2] - margin).all() and (lm[..., 1] <= boxes[:, 3:4] + margin).all()
    eyes_y = lm[:, 36:48, 1].mean(axis=1)
    assert (eyes_y < lm[:, 30, 1]).all() and (lm[:, 30, 1] < lm[:, 48:68, 1].mean(axis=1)).all()
    assert (lm[:, 36:42, 0].mean(axis=1) < lm[:, 42:48, 0].mean(axis=1)).all()  # left eye on the left
    eye_distance = np.hypot(*(lm[:, 42:48].mean(axis=1) - lm[:, 36:42].mean(axis=1)).T)
    assert ((eye_distance > 0.25 * size) & (eye_distance < 0.6 * size)).all()


@pytest.mark.parametrize("clip", ["face1.mp4", "face2.mp4"])
def test_every_frame_of_the_shared_clips_is_tracked(media_dir: Path, clip):
    track = track_faces(iter_frames(media_dir / clip))
    assert len(track) == {"face1.mp4": 135, "face2.mp4": 125}[clip]
    assert track.found.all() and track.faceless_ranges() == []
    _check_plausible_faces(track)
    # a talking head moves smoothly: no landmark jumps by more than 5 % of the face between frames
    size = (track.boxes[:, 2:] - track.boxes[:, :2]).mean()
    assert np.abs(np.diff(track.landmarks, axis=0)).max() < 0.05 * size


def test_blank_frames_of_a_generated_clip_are_flagged(tmp_path: Path):
    clip = write_face_clip(
        tmp_path / "blank.mp4",
        n_frames=20,
        rate=Fraction(25),
        size=(320, 240),
        with_audio=False,
        blank_frames=(0, 6, 7, 8, 19),
    )
    track = track_faces(iter_frames(clip))
    assert track.faceless_ranges() == [(0, 1), (6, 9), (19, 20)]
    _check_plausible_faces(track)


def _two_faces(shift: int, blank_right: bool = False) -> np.ndarray:
    canvas = np.full((300, 620, 3), 90, np.uint8)
    face = face_image()
    canvas[20 : 20 + 256, 10 + shift : 266 + shift] = face
    small = cv2.resize(face, (200, 200), interpolation=cv2.INTER_AREA)
    canvas[50:250, 380 - shift : 580 - shift] = 0 if blank_right else small
    return canvas


@pytest.mark.parametrize(
    ("select", "side"), [("largest", "left"), (0, "left"), (1, "right"), ((470, 140), "right")]
)
def test_two_real_faces_the_selected_one_is_kept(select, side):
    frames = [_two_faces(2 * i, blank_right=(i == 3)) for i in range(5)]
    track = track_faces(frames, select=select, tracker=Tracker(smooth_window=None))
    centre_x = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    if side == "left":
        assert track.found.all() and (centre_x < 310).all()
    else:  # the right face is blacked out on frame 3: that frame has no face, never the left one
        assert track.found.tolist() == [True, True, True, False, True]
        assert (centre_x[track.found] > 310).all()
    _check_plausible_faces(track)


# --- following the face between key frames, on painted faces ------------------------------------------------


def face_texture(seed: int, side: int = 80) -> np.ndarray:
    """Blotches at the scale of a face's features; red above 127: what PaintedFaceDetector looks for."""
    blotches = np.random.default_rng(seed).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    texture = cv2.resize(blotches, (side, side), interpolation=cv2.INTER_LINEAR)
    texture[..., 0] = texture[..., 0] // 2 + 128
    return texture


TEXTURE = face_texture(1)


BACKGROUND = (
    100,
    175,
    175,
)  # as bright as the faces, so that their texture, not their outline, tells them apart


def painted(x: int, y: int, texture: np.ndarray = TEXTURE) -> np.ndarray:
    """A 240 x 320 frame, plain but for a textured 'face' with its top-left corner at (x, y)."""
    frame = np.full((240, 320, 3), BACKGROUND, np.uint8)
    frame[y : y + texture.shape[0], x : x + texture.shape[1]] = texture
    return frame


class PaintedFaceDetector:
    """Finds the painted face in whatever image it is given (a region, a downscaled copy): the box of its red
    pixels. Counts the images it searched."""

    identity = "painted"

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        found = []
        for frame in frames_rgb:
            self.calls += 1
            ys, xs = np.nonzero(frame[..., 0] > 110)
            found.append(
                np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 1.0]])
                if len(xs)
                else np.zeros((0, 5))
            )
        return found


class PaintedLandmarks(BoxLandmarks):
    """Like a landmark model: the points lock onto the painted face near the box it is given (the box widened by
    half), whatever the box's offset; with no face there, they land in the box."""

    identity = "painted-pattern"

    def landmarks(self, frames_rgb, boxes):
        boxes = np.array(boxes, np.float64)
        for k, (frame, box) in enumerate(zip(frames_rgb, boxes, strict=True)):
            margin = 0.5 * (box[2:4] - box[:2])
            x0, y0 = np.maximum(box[:2] - margin, 0).astype(int)
            x1, y1 = (box[2:4] + margin).astype(int)
            ys, xs = np.nonzero(frame[y0:y1, x0:x1, 0] > 110)
            if len(xs):
                boxes[k, :4] = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
        return super().landmarks(frames_rgb, boxes)


def following(landmarker=None, **settings) -> Tracker:
    settings = {"key_interval": 10, "detect_face_size": None, "smooth_window": None, **settings}
    return Tracker(detector=PaintedFaceDetector(), landmarker=landmarker or PaintedLandmarks(), **settings)


def test_the_face_is_detected_on_key_frames_only_and_followed_between():
    frames = [painted(40 + 2 * i, 60 + i) for i in range(30)]
    tracker = following()
    track = track_faces(frames, tracker=tracker)
    assert tracker.detector.calls == 3  # frames 0, 10 and 20
    assert track.found.all()
    truth = np.array([[40 + 2 * i, 60 + i, 120 + 2 * i, 140 + i] for i in range(30)], np.float64)
    # followed frames take the box the detector gave, in the landmarks' face frame, placed on the previous
    # frame's landmarks: one frame behind a moving face, exact on the detected ones
    np.testing.assert_allclose(track.raw_boxes[::10], truth[::10])
    followed = np.setdiff1d(np.arange(30), np.arange(0, 30, 10))
    np.testing.assert_allclose(track.raw_boxes[followed], truth[followed - 1], atol=1e-9)
    np.testing.assert_allclose(track.landmarks, PaintedLandmarks().landmarks(frames, truth), atol=1e-9)


def test_a_face_that_vanishes_is_detected_again_and_flagged():
    frames = (
        [painted(40, 60)] * 5 + [np.full((240, 320, 3), BACKGROUND, np.uint8)] * 3 + [painted(44, 62)] * 5
    )
    tracker = following()
    track = track_faces(frames, tracker=tracker)
    assert track.faceless_ranges() == [(5, 8)]
    # detected on frame 0, then on each faceless frame (following failed, then nothing was there), then once
    # more on frame 8 where the face is back
    assert tracker.detector.calls == 1 + 3 + 1
    np.testing.assert_allclose(track.raw_boxes[8], [44, 62, 124, 142])


class DriftingLandmarks(PaintedLandmarks):
    """BoxLandmarks, but on the frames listed the points come out shifted by half the box: lost landmarks."""

    def __init__(self, drift_on: set[int]) -> None:
        self.drift_on, self.calls = drift_on, 0

    def landmarks(self, frames_rgb, boxes):
        points = super().landmarks(frames_rgb, boxes)
        if self.calls in self.drift_on:
            points = points + 0.5 * (boxes[:, None, 2:4] - boxes[:, None, :2])
        self.calls += 1
        return points


def test_landmarks_that_drift_off_the_face_trigger_a_detection():
    frames = [painted(40, 60)] * 12
    # call 5 = frame 5: frames 0-4 take one call each
    tracker = following(DriftingLandmarks(drift_on={5}), key_interval=100)
    track = track_faces(frames, tracker=tracker)
    assert tracker.detector.calls == 2  # frame 0, and frame 5 where the followed points left the face
    assert track.found.all()
    np.testing.assert_allclose(track.raw_boxes, [[40, 60, 120, 140]] * 12)  # frame 5: the detector's box


def test_a_cut_to_another_face_at_the_same_place_triggers_a_detection():
    frames = [painted(40, 60)] * 6 + [painted(40, 60, face_texture(7))] * 6
    tracker = following(key_interval=100)
    track_faces(frames, tracker=tracker)
    assert tracker.detector.calls == 2  # frame 0 and the cut


def test_key_frame_detection_searches_around_the_followed_face():
    class RegionRecorder(PaintedFaceDetector):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, int]] = []

        def detect(self, frames_rgb):
            self.shapes += [frame.shape[:2] for frame in frames_rgb]
            return super().detect(frames_rgb)

    tracker = Tracker(
        detector=RegionRecorder(), landmarker=PaintedLandmarks(), key_interval=3, detect_face_size=None
    )
    track = track_faces([painted(100, 100, face_texture(2, side=40))] * 4, tracker=tracker)
    # frame 0 whole (240 x 320); frame 3 within the face's box widened by its size on each side
    assert tracker.detector.shapes == [(240, 320), (120, 120)]
    np.testing.assert_allclose(track.raw_boxes[3], [100, 100, 140, 140])


def test_tracker_identity_names_every_setting():
    base = following()
    variants = [
        following(key_interval=None),
        following(key_interval=5),
        following(detect_face_size=120),
        following(min_correlation=0.7),
        following(smooth_window=7),
        Tracker(
            detector=ScriptedDetector([]), landmarker=BoxLandmarks(), key_interval=10, detect_face_size=None
        ),
    ]
    identities = {base.identity, *(v.identity for v in variants)}
    assert len(identities) == 1 + len(variants)
    assert following().identity == base.identity  # the same settings: the same cache entries
    from retalk.tracking import DlibDetector

    assert DlibDetector(upsample=0).identity != DlibDetector().identity


# --- the reference's S3FD and FAN behind the tracker ------------------------------------------------------------


class FaceCellS3FD(torch.nn.Module):
    """A stand-in S3FD that records its inputs and answers one face per image: at the stride-8 cell (row 2 + b % 2,
    column 1) of image b with box offsets that push its left edge below 0; image ``faceless`` gets none."""

    def __init__(self, faceless: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.faceless = faceless
        self.inputs: list[torch.Tensor] = []
        self.seen = 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.inputs.append(x.clone())
        b, _, h, w = x.shape
        outputs = []
        for level in range(6):
            stride = 2 ** (level + 2)
            cls = torch.zeros(b, 2, max(h // stride, 1), max(w // stride, 1))
            cls[:, 0] = 10.0
            reg = torch.zeros(b, 4, *cls.shape[2:])
            if level == 1:
                for k in range(b):
                    if self.seen + k != self.faceless:
                        cls[k, :, 2 + (self.seen + k) % 2, 1] = torch.tensor([0.0, 4.0])
                        reg[k, :, 2 + (self.seen + k) % 2, 1] = torch.tensor([-0.7, 0.3, 0.4, 0.1])
            outputs += [cls, reg]
        self.seen += b
        return outputs


class CentreFAN(torch.nn.Module):
    """A stand-in FAN: every heat-map peaks at the centre cell; records its batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[int] = []

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self.batches.append(crops.shape[0])
        heatmaps = torch.zeros(crops.shape[0], 68, 64, 64)
        heatmaps[:, :, 32, 32] = 1.0
        return heatmaps


def test_s3fd_receives_what_the_reference_feeds_it():
    """The reference's face_detect reverses its BGR frames to RGB and subtracts the BGR Caffe means from them."""
    from retalk.tracking import S3FDDetector

    frames_rgb = np.random.default_rng(3).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    model = FaceCellS3FD()
    S3FDDetector(lambda: model, "stand-in").detect(frames_rgb)
    frames_bgr = frames_rgb[..., ::-1]  # what cv2 decodes
    images = frames_bgr[..., ::-1]  # get_detections_for_batch
    expected = torch.from_numpy(
        (images - np.array([104, 117, 123])).transpose(0, 3, 1, 2)
    ).float()  # batch_detect
    assert len(model.inputs) == 1  # the three frames in one forward pass
    assert torch.equal(model.inputs[0], expected)


def test_the_reference_tracker_keeps_s3fd_boxes_as_decoded_and_fan_points():
    from retalk.device import batch_size
    from retalk.models.fan import landmarks_from_boxes
    from retalk.models.s3fd import decode_detections
    from retalk.tracking import FANLandmarks, S3FDDetector

    frames = np.random.default_rng(4).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    s3fd, fan = FaceCellS3FD(faceless=2), CentreFAN()
    tracker = Tracker(
        detector=S3FDDetector(lambda: s3fd, "stand-in"),
        landmarker=FANLandmarks(lambda: fan, "stand-in"),
        detect_face_size=None,
        key_interval=None,
    )
    track = track_faces([frames], tracker=tracker)
    assert track.found.tolist() == [True, True, False, True, True]
    decoded = decode_detections(FaceCellS3FD(faceless=2)(torch.zeros(5, 3, 64, 64)))
    expected = np.array([faces[0, :4] if len(faces) else [np.nan] * 4 for faces in decoded], np.float64)
    np.testing.assert_array_equal(track.raw_boxes, expected)  # float32 as decoded: not clipped, not truncated
    assert (track.raw_boxes[track.found, 0] < 0).all()
    per_pass = batch_size(torch.device("cpu"), tracking.FAN_ITEM_MB)  # as many crops as the CPU budget holds
    assert per_pass > 1 and fan.batches == [min(per_pass, 4)] * (4 // min(per_pass, 4))
    points = landmarks_from_boxes(
        CentreFAN(), list(frames[track.found]), expected[track.found], truncate=False
    )
    np.testing.assert_allclose(
        track.landmarks[track.found], tracking._smooth_runs(points, np.ones(4, bool), 7, 2), atol=1e-9
    )


@pytest.fixture
def checkpoints(tmp_path, monkeypatch) -> Path:
    """An empty checkpoints folder, the only one searched."""
    from retalk.checkpoints import catalogue

    monkeypatch.delenv(catalogue.ENV_VAR, raising=False)
    monkeypatch.setattr(catalogue, "default_checkpoints_dir", lambda: tmp_path / "user-cache")
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints"


def test_reference_tracker_names_its_files_and_what_is_missing(checkpoints):
    from retalk.checkpoints.catalogue import FAN, S3FD
    from retalk.tracking import reference_tracker

    with pytest.raises(
        CheckpointError, match=r"needs s3fd-619a316812\.pth and 2DFAN4-cd938726ad\.zip.*retalk models fetch"
    ) as err:
        reference_tracker(checkpoints, "cpu")
    assert "\n" not in str(err.value)
    (checkpoints / S3FD).write_bytes(b"weights")
    with pytest.raises(CheckpointError, match=r"needs 2DFAN4-cd938726ad\.zip;"):
        reference_tracker(checkpoints, "cpu")
    (checkpoints / FAN).write_bytes(b"weights")
    tracker = reference_tracker(checkpoints, "cpu")  # nothing is loaded until the first frame
    assert tracker.key_interval is None and tracker.detect_face_size is None
    assert f"s3fd-rgb[{S3FD}:7:" in tracker.identity and f"fan[{FAN}:7:" in tracker.identity
    os.utime(checkpoints / S3FD, ns=(0, 0))  # a replaced file is another tracker
    assert reference_tracker(checkpoints, "cpu").identity != tracker.identity


# --- the detector a re-dub uses -------------------------------------------------------------------------------


def _request(tmp_path: Path, checkpoints: Path, detector: str):
    from retalk.pipeline import RedubRequest

    return RedubRequest(
        video=tmp_path / "v.mp4",
        audio=tmp_path / "a.wav",
        output=tmp_path / "o.mp4",
        checkpoints=checkpoints,
        detector=detector,
        device="cpu",
    )


DLIB = "dlib-hog-up1-max1024+dlib68-face120-"


@pytest.mark.parametrize(
    ("detector", "engine", "files", "expected", "warning"),
    [
        ("auto", "neural", "real", "s3fd-rgb", None),
        ("auto", "neural", None, DLIB + "every-frame", "S3FD and FAN are absent"),
        ("auto", "neural", "synthetic", DLIB + "every-frame", "synthetic stand-ins"),
        ("reference", "neural", "synthetic", "s3fd-rgb", None),
        ("auto", "preview", "real", DLIB + "key25", None),
        ("dlib", "neural", "real", DLIB + "every-frame", None),
        ("dlib", "preview", "real", DLIB + "key25", None),
        ("reference", "preview", "real", DLIB + "key25", None),  # the preview engine ignores --detector
    ],
)
def test_the_detector_follows_the_request_and_the_files(
    tmp_path, checkpoints, detector, engine, files, expected, warning
):
    from retalk.checkpoints import synth
    from retalk.checkpoints.catalogue import FAN, S3FD
    from retalk.pipeline.redub import choose_tracker

    if files == "synthetic":
        synth(checkpoints, [S3FD])
    for name in (S3FD, FAN) if files else ():
        if not (checkpoints / name).exists():
            (checkpoints / name).write_bytes(b"weights")
    tracker, warnings = choose_tracker(_request(tmp_path, checkpoints, detector), engine)
    assert tracker.identity.startswith(expected)
    if warning:
        (line,) = warnings
        assert warning in line and "dlib-shaped" in line and "retalk models fetch" in line
    else:
        assert warnings == []


def test_the_reference_detector_without_its_files_is_a_one_line_error(tmp_path, checkpoints):
    from retalk.pipeline.redub import choose_tracker

    with pytest.raises(CheckpointError, match="retalk models fetch") as err:
        choose_tracker(_request(tmp_path, checkpoints, "reference"), "neural")
    assert "\n" not in str(err.value)


def test_the_detector_option_reaches_the_request_and_is_checked(tmp_path, checkpoints):
    import argparse

    from retalk.commands import redub as redub_command

    parser = argparse.ArgumentParser()
    redub_command.register(parser.add_subparsers())
    args = parser.parse_args(["redub", "--video", "v", "--audio", "a", "-o", "o", "--detector", "reference"])
    assert redub_command.request_from_args(args, video="v", audio="a", output="o").detector == "reference"
    with pytest.raises(SystemExit):
        parser.parse_args(["redub", "--video", "v", "--audio", "a", "-o", "o", "--detector", "retina"])
    with pytest.raises(InputError, match="--detector 'retina': expected one of auto, reference, dlib"):
        _request(tmp_path, checkpoints, "retina").validate()


def test_the_track_cache_is_keyed_by_the_trackers_identity(tmp_path):
    from retalk.cache import ArtifactCache
    from retalk.pipeline.redub import _Stages, _track

    video = write_face_clip(
        tmp_path / "clip.mkv", n_frames=4, size=(320, 240), codec="lossless", with_audio=False
    )
    request = _request(tmp_path, tmp_path, "auto")
    request.video = video
    cache, stages = ArtifactCache(tmp_path / "cache"), _Stages(None, None)
    boxes = [[LEFT]] * 4

    def run(**settings):
        return _track(request, scripted_tracker(boxes, **settings), 0, 4, "content", cache, stages)

    first, hit = run()
    assert not hit
    again, hit = run()  # a new tracker object with the same settings
    assert hit and np.array_equal(again.landmarks, first.landmarks)
    _, hit = run(smooth_window=None)
    assert not hit


def test_the_preview_trackers_path_never_imports_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from mediagen import face_image\n"
        "from retalk.tracking import track_faces\n"
        "assert track_faces([face_image()] * 3).found.all()\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert done.stdout.strip() == "False"


def test_following_stays_close_to_per_frame_detection(media_dir: Path):
    """Landmarks followed between key frames against dlib on every frame: within the spread of per-frame detection
    itself at another detection scale (benchmarks/tracking.py measures both: about 1.9 px mean here)."""
    frames = np.concatenate([chunk.frames for chunk in iter_frames(media_dir / "face1.mp4")])
    every = track_faces(frames, tracker=Tracker(key_interval=None, smooth_window=None))
    followed = track_faces(frames, tracker=Tracker(smooth_window=None))
    distance = np.hypot(*(followed.landmarks - every.landmarks).transpose(2, 0, 1)).mean(axis=1)
    assert followed.found.all() and every.found.all()
    assert distance.mean() < 3.0 and distance.max() < 10.0  # a 220 px face

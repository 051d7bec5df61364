"""Face tracking: the selection/identity rules on scripted detections, then dlib on real faces."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from mediagen import face_image, write_face_clip

import retalk.tracking as tracking
from retalk.errors import CheckpointError, InputError
from retalk.media import iter_frames
from retalk.tracking import DlibLandmarks, FaceSelector, FaceTrack, track_faces

# --- scripted detections: the selection and identity rules, exactly -------------------------------------

FRAME = np.zeros((240, 320, 3), np.uint8)


class ScriptedDetector:
    """Returns the listed (k, 5) boxes for frame i; remembers the frame sizes it was given."""

    def __init__(self, per_frame: list[list[tuple[float, float, float, float]]]) -> None:
        self.per_frame = per_frame
        self.calls = 0

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        boxes = self.per_frame[self.calls]
        self.calls += 1
        return np.array([[*b, 1.0] for b in boxes]).reshape(-1, 5)


class BoxLandmarks:
    """68 points on a fixed pattern inside each box, so landmarks follow boxes exactly."""

    pattern = np.random.default_rng(0).uniform(0.1, 0.9, (68, 2))

    def landmarks(self, frame_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes)
        return boxes[:, None, :2] + self.pattern[None] * (boxes[:, None, 2:4] - boxes[:, None, :2])


def scripted(per_frame, select="largest", **kwargs) -> FaceTrack:
    frames = [FRAME] * len(per_frame)
    return track_faces(
        frames,
        select=select,
        detector=ScriptedDetector(per_frame),
        landmarker=BoxLandmarks(),
        detect_face_size=None,
        **kwargs,
    )


LEFT = (20.0, 60.0, 80.0, 120.0)  # 60 px
RIGHT = (200.0, 50.0, 290.0, 140.0)  # 90 px


def shifted(box, dx=0.0, dy=0.0, grow=0.0):
    x1, y1, x2, y2 = box
    return (x1 + dx - grow, y1 + dy - grow, x2 + dx + grow, y2 + dy + grow)


def test_largest_is_chosen_once_and_then_followed():
    # The left face grows past the right one: the track must stay on the person chosen first.
    frames = [[LEFT, RIGHT]] + [[shifted(LEFT, grow=10 * i), shifted(RIGHT, dx=2 * i)] for i in range(1, 6)]
    track = scripted(frames, smooth=False)
    assert track.found.all()
    np.testing.assert_allclose(track.boxes, [shifted(RIGHT, dx=2 * i) for i in range(6)])


def test_raw_boxes_are_the_detector_boxes_before_smoothing_and_gap_filling():
    # Consumers that follow the reference's own box rule (pads, a 5-frame mean) start from these, not from the
    # Savitzky-Golay-smoothed boxes.
    wobble = [shifted(LEFT, dx=3.0 * (-1) ** i) for i in range(10)]
    track = scripted([[b] for b in wobble[:8]] + [[]] + [[b] for b in wobble[9:]])
    raw = np.array(wobble)
    raw[8] = np.nan
    np.testing.assert_array_equal(track.raw_boxes, raw)
    assert not np.allclose(track.boxes[:8], raw[:8])  # the smoothed ones differ
    assert np.isfinite(track.boxes).all()


@pytest.mark.parametrize(("select", "expected"), [(0, LEFT), (1, RIGHT), ("1", RIGHT), ("0", LEFT)])
def test_index_counts_faces_left_to_right(select, expected):
    track = scripted([[RIGHT, LEFT]] * 3, select=select, smooth=False)  # detector lists them right first
    np.testing.assert_allclose(track.boxes, [expected] * 3)


@pytest.mark.parametrize(
    ("select", "expected"), [((250, 100), RIGHT), ("30,70", LEFT), ((130, 90), LEFT), ((199, 300), RIGHT)]
)
def test_point_picks_the_face_containing_or_nearest_it(select, expected):
    track = scripted([[LEFT, RIGHT]] * 2, select=select, smooth=False)
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
    track = scripted(frames, select=1, smooth=False)
    assert track.found.tolist() == [True] * 3 + [False] * 4 + [True] * 2
    assert track.faceless_ranges() == [(3, 7)]
    np.testing.assert_allclose(track.boxes[7:], [shifted(RIGHT, dx=-6)] * 2)


def test_a_single_face_is_found_again_after_a_gap_even_if_it_moved():
    frames = [[LEFT]] * 2 + [[]] * 3 + [[shifted(LEFT, dx=45, dy=20)]] * 2
    track = scripted(frames, smooth=False)
    assert track.faceless_ranges() == [(2, 5)]
    np.testing.assert_allclose(track.boxes[5:], [shifted(LEFT, dx=45, dy=20)] * 2)


def test_faceless_frames_are_interpolated_between_their_neighbours():
    frames = [[LEFT], [], [], [shifted(LEFT, dx=30)]]
    track = scripted(frames, smooth=False)
    np.testing.assert_allclose(track.boxes[1], shifted(LEFT, dx=10))
    np.testing.assert_allclose(track.boxes[2], shifted(LEFT, dx=20))
    np.testing.assert_allclose(
        track.landmarks[1], BoxLandmarks().landmarks(FRAME, np.array([shifted(LEFT, dx=10)]))[0]
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
    raw = scripted([[tuple(b)] for b in noisy], smooth=False)
    smooth = scripted([[tuple(b)] for b in noisy], smooth=True)
    raw_err = np.abs(raw.boxes - truth).mean()
    smooth_err = np.abs(smooth.boxes - truth).mean()
    assert smooth_err < 0.75 * raw_err
    assert abs((smooth.boxes - truth).mean()) < 0.3


def test_short_runs_are_smoothed_with_a_shorter_window_or_kept():
    boxes = [[shifted(LEFT, dx=d)] for d in (0, 3, 1)] + [[]] + [[shifted(LEFT, dx=2)]]
    track = scripted(boxes, smooth=True)
    assert track.found.tolist() == [True, True, True, False, True]
    np.testing.assert_allclose(track.boxes[4], shifted(LEFT, dx=2))  # a run of 1 is left as detected
    # a quadratic fit through 3 points is exact: the run is unchanged
    np.testing.assert_allclose(track.boxes[:3], [shifted(LEFT, dx=d) for d in (0, 3, 1)], atol=1e-9)


def test_accepts_chunks_batches_and_single_frames_and_reports_progress():
    per_frame = [[shifted(RIGHT, dx=i)] for i in range(5)]
    stack = np.stack([FRAME] * 5)
    done: list[int] = []
    as_chunks = track_faces(
        [SimpleNamespace(start=0, frames=stack[:3]), SimpleNamespace(start=3, frames=stack[3:])],
        detector=ScriptedDetector(per_frame),
        landmarker=BoxLandmarks(),
        progress=done.append,
    )
    as_batch = track_faces([stack], detector=ScriptedDetector(per_frame), landmarker=BoxLandmarks())
    as_frames = track_faces(list(stack), detector=ScriptedDetector(per_frame), landmarker=BoxLandmarks())
    assert done == [1, 2, 3, 4, 5]
    for other in (as_batch, as_frames):
        np.testing.assert_array_equal(other.boxes, as_chunks.boxes)
        np.testing.assert_array_equal(other.landmarks, as_chunks.landmarks)


def test_detection_runs_at_the_tracked_face_scale():
    class SizeRecorder(ScriptedDetector):
        sizes: list[tuple[int, int]] = []

        def detect(self, frame_rgb):
            self.sizes.append(frame_rgb.shape[:2])
            return super().detect(frame_rgb)

    big = (100.0, 100.0, 420.0, 420.0)  # a 320-px face
    frame = np.zeros((600, 800, 3), np.uint8)
    detector = SizeRecorder([[big]] + [[(50.0, 50.0, 210.0, 210.0)]] * 2)  # boxes at half scale
    track = track_faces(
        [frame] * 3, detector=detector, landmarker=BoxLandmarks(), detect_face_size=160, smooth=False
    )
    assert detector.sizes == [(600, 800), (300, 400), (300, 400)]
    np.testing.assert_allclose(track.boxes, [big] * 3)  # mapped back to frame pixels


def test_bad_frames_are_input_errors():
    with pytest.raises(InputError, match="uint8"):
        track_faces(
            [np.zeros((8, 8, 3), np.float32)], detector=ScriptedDetector([[]]), landmarker=BoxLandmarks()
        )
    with pytest.raises(InputError, match="frames"):
        track_faces(
            [np.zeros((2, 2, 8, 8, 3), np.uint8)], detector=ScriptedDetector([[]]), landmarker=BoxLandmarks()
        )


def test_save_and_load_round_trip(tmp_path: Path):
    track = scripted([[LEFT], [], [shifted(LEFT, dx=4)]])
    track.save(tmp_path / "track.npz")
    loaded = FaceTrack.load(tmp_path / "track.npz")
    for name in ("boxes", "landmarks", "found", "raw_boxes"):
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
    (tmp_path / tracking.SHAPE_PREDICTOR_FILE).write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="not a dlib shape predictor"):
        DlibLandmarks(checkpoints_dir=tmp_path)


# --- dlib on real faces ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def landmarker() -> DlibLandmarks:
    return DlibLandmarks()


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
def test_every_frame_of_the_shared_clips_is_tracked(media_dir: Path, landmarker, clip):
    track = track_faces(iter_frames(media_dir / clip), landmarker=landmarker)
    assert len(track) == {"face1.mp4": 135, "face2.mp4": 125}[clip]
    assert track.found.all() and track.faceless_ranges() == []
    _check_plausible_faces(track)
    # a talking head moves smoothly: no landmark jumps by more than 5 % of the face between frames
    size = (track.boxes[:, 2:] - track.boxes[:, :2]).mean()
    assert np.abs(np.diff(track.landmarks, axis=0)).max() < 0.05 * size


def test_blank_frames_of_a_generated_clip_are_flagged(tmp_path: Path, landmarker):
    clip = write_face_clip(
        tmp_path / "blank.mp4",
        n_frames=20,
        rate=Fraction(25),
        size=(320, 240),
        with_audio=False,
        blank_frames=(0, 6, 7, 8, 19),
    )
    track = track_faces(iter_frames(clip), landmarker=landmarker)
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
def test_two_real_faces_the_selected_one_is_kept(landmarker, select, side):
    frames = [_two_faces(2 * i, blank_right=(i == 3)) for i in range(5)]
    track = track_faces(frames, select=select, landmarker=landmarker, smooth=False)
    centre_x = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    if side == "left":
        assert track.found.all() and (centre_x < 310).all()
    else:  # the right face is blacked out on frame 3: that frame has no face, never the left one
        assert track.found.tolist() == [True, True, True, False, True]
        assert (centre_x[track.found] > 310).all()
    _check_plausible_faces(track)


def test_official_networks_slot_in_behind_the_tracker_protocols():
    """RetinaFace, S3FD and FAN adapters (random weights: plumbing and coordinates, not accuracy)."""
    import torch

    from retalk.models.fan import FAN
    from retalk.models.retinaface import RetinaFace
    from retalk.models.s3fd import S3FD
    from retalk.tracking import FANLandmarks, RetinaFaceDetector, S3FDDetector

    torch.manual_seed(0)
    frame = np.ascontiguousarray(face_image()[:128, :160])
    for detector in (
        RetinaFaceDetector(RetinaFace().eval(), confidence_threshold=0.0),
        S3FDDetector(S3FD().eval()),
    ):
        boxes = detector.detect(frame)
        assert boxes.ndim == 2 and boxes.shape[1] == 5
        if len(boxes):  # best first, scores are probabilities
            assert np.all(np.diff(boxes[:, 4]) <= 0) and np.all((boxes[:, 4] >= 0) & (boxes[:, 4] <= 1))
    assert len(RetinaFaceDetector(RetinaFace().eval(), confidence_threshold=0.0).detect(frame)) > 0

    box = np.array([[40.0, 30.0, 120.0, 110.0]])
    points = FANLandmarks(FAN().eval()).landmarks(frame, box)
    assert points.shape == (1, 68, 2)
    # every point lies in FAN's crop around the box (centre moved up 0.12 h, side 200 * (w + h) / 195)
    side = 200 * (80 + 80) / 195
    centre = np.array([80.0, 70.0 - 0.12 * 80])
    assert np.all(np.abs(points[0] - centre) <= side / 2 + 1)
    detector = ScriptedDetector([[tuple(box[0])]])
    track = track_faces([frame], detector=detector, landmarker=FANLandmarks(FAN().eval()), smooth=False)
    assert track.found[0] and np.all(np.abs(track.landmarks[0] - centre) <= side / 2 + 1)

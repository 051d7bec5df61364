"""The neural engine's face geometry (retalk.engines.geometry): the reference's box rule, the crop mapping, the
five points, validation of injected geometry and filling from a face track. The rules against the recorded
reference run are in test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from retalk.engines.geometry import (
    FaceGeometry,
    detector_points,
    enet_boxes,
    landmark_box,
    smooth_boxes,
    to_crop,
)
from retalk.errors import InputError
from retalk.tracking import FaceTrack


def test_smoothing_updates_in_place_as_the_reference():
    """Box i becomes the mean of boxes i..i+4 (the last five near the end), truncated and written back at once:
    later windows average already smoothed rows."""
    x = np.array([0, 10, 20, 30, 40, 50])
    boxes = np.stack([x, x, x + 1, x + 1], axis=1)
    # i=0: mean(0..40)=20; i=1: mean(10..50)=30; i>=2: the last five, with rows 1.. already replaced
    np.testing.assert_array_equal(smooth_boxes(boxes)[:, 0], [20, 30, 34, 36, 38, 37])


def test_a_run_shorter_than_the_window_is_averaged_whole():
    boxes = np.array([[0, 0, 10, 10], [3, 3, 13, 13]])
    # row 0: mean of both, 1.5 -> 1; row 1: mean of the updated row 0 and row 1, 2
    np.testing.assert_array_equal(smooth_boxes(boxes), [[1, 1, 11, 11], [2, 2, 12, 12]])


def test_enet_box_clips_truncates_pads_and_clamps():
    raw = np.array([[-3.7, 10.9, 100.2, 180.8, 0.99]], np.float32)
    np.testing.assert_array_equal(enet_boxes(raw, 90, 210), [[0, 10, 90, 200]])  # +20 px below, x2 clamped
    np.testing.assert_array_equal(
        enet_boxes(raw, 90, 190), [[0, 10, 90, 190]]
    )  # the pad clamped at the bottom


def test_crop_mapping_is_cv2_resize_pixel_centres():
    box = np.array([10, 20, 110, 220])
    # the box's centre is the crop's centre; its first pixel centre lands at (0.5 * scale - 0.5)
    np.testing.assert_allclose(to_crop([[59.5, 119.5]], box), [[127.5, 127.5]])
    np.testing.assert_allclose(to_crop([[10, 20]], box), [[0.5 * 2.56 - 0.5, 0.5 * 1.28 - 0.5]])


def test_five_points_and_face_box_of_68_landmarks():
    lm = np.arange(136, dtype=np.float64).reshape(68, 2)
    points = detector_points(lm)
    np.testing.assert_array_equal(points, [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
    x0, y0, x1, y1 = landmark_box(lm)
    assert (x0, x1, y1) == (0, 134, 135) and y0 == pytest.approx(1 - 0.3 * 134)


def _lm(n: int) -> np.ndarray:
    """A face of plausible proportions drifting right: 68 points per frame."""
    rng = np.random.default_rng(0)
    base = np.array([200.0, 200.0]) + rng.uniform(-60, 60, (68, 2))
    base[36:42], base[42:48] = [170, 170], [230, 170]  # eyes
    base[30], base[48], base[54] = [200, 210], [180, 250], [220, 250]
    return np.stack([base + [3 * k, 0] for k in range(n)])


def test_a_track_fills_every_field_and_faceless_frames_borrow_a_neighbour():
    lm = _lm(6)
    found = np.array([True, True, False, True, True, True])
    raw = np.c_[lm.min(1), lm.max(1)]
    raw[2] = np.nan
    track = FaceTrack(raw.copy(), lm, found, raw, lm)
    geometry = FaceGeometry.from_track(track, 640, 480)
    assert len(geometry) == 6 and geometry.found.tolist() == found.tolist()
    np.testing.assert_array_equal(geometry.enet_boxes[2], geometry.enet_boxes[1])  # borrowed
    # the runs [0, 2) and [3, 6) are smoothed apart
    np.testing.assert_array_equal(geometry.enet_boxes[:2], enet_boxes(raw[:2], 640, 480))
    np.testing.assert_array_equal(geometry.enet_boxes[3:], enet_boxes(raw[3:], 640, 480))
    assert geometry.crop_landmarks.dtype == np.float32 and geometry.restore_points.dtype == np.float32
    inside = (geometry.crop_landmarks >= 0) & (geometry.crop_landmarks < 256)
    assert inside.all()  # the head crop holds the whole face
    subset = geometry.rows(np.array([4, 5]))
    np.testing.assert_array_equal(subset.stit_quads, geometry.stit_quads[4:])


def test_injected_geometry_is_validated():
    geometry = FaceGeometry.from_track(
        FaceTrack(np.zeros((2, 4)), _lm(2), np.ones(2, bool), np.c_[_lm(2).min(1), _lm(2).max(1)], _lm(2)),
        640,
        480,
    )
    fields = {f: getattr(geometry, f) for f in FaceGeometry._SHAPES}
    with pytest.raises(InputError, match="enhance_points has shape"):
        FaceGeometry(**{**fields, "enhance_points": np.zeros((2, 4, 2))})
    with pytest.raises(InputError, match="restore_points is not finite"):
        FaceGeometry(**{**fields, "restore_points": np.full((2, 5, 2), np.nan)})
    empty = fields["enet_boxes"].copy()
    empty[1, 2] = empty[1, 0]
    with pytest.raises(InputError, match="enet_boxes has an empty box"):
        FaceGeometry(**{**fields, "enet_boxes": empty})
    with pytest.raises(InputError, match="no frame has a face"):
        FaceGeometry.from_landmarks(_lm(2), np.zeros((2, 4)), [False, False], 640, 480)

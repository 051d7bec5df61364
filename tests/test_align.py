"""Face geometry against golden/functions.npz (align.*, calc_alignment.*) and its defining properties."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from retalk.align import (
    FACE_TEMPLATE_FFHQ_512,
    FACE_TEMPLATE_GPEN_512,
    LM3D_STD,
    STIT_CROP_CORNERS_256,
    align_img,
    calc_alignment_coefficients,
    crop_box,
    ffhq_quad,
    five_points,
    gpen_warp_matrices,
    load_lm3d,
    pos,
    quad_from_landmarks,
    similarity_transform,
)
from retalk.errors import InputError


@pytest.mark.golden
def test_lm3d_template_matches_golden(golden_functions, reference_dir: Path):
    np.testing.assert_array_equal(LM3D_STD, golden_functions["align.lm3d_std"])
    np.testing.assert_array_equal(
        load_lm3d(reference_dir / "data" / "similarity_Lm3D_all.mat"), golden_functions["align.lm3d_std"]
    )


@pytest.mark.golden
@pytest.mark.parametrize("face", ["a", "b"])
def test_align_img_matches_golden(golden_functions, face):
    img, lm_fan = golden_functions[f"align.img_{face}_rgb_u8"], golden_functions[f"align.lm_fan_{face}"]
    lm_yup = np.stack([lm_fan[:, 0], img.shape[0] - 1 - lm_fan[:, 1]], axis=1)
    np.testing.assert_array_equal(lm_yup, golden_functions[f"align.lm_{face}"])
    trans_params, im_aligned, lm_aligned, lm5p = align_img(img, lm_yup, golden_functions["align.lm3d_std"])
    assert trans_params.dtype == np.float32
    np.testing.assert_allclose(trans_params, golden_functions[f"align.trans_params_{face}"], rtol=1e-6)
    assert im_aligned.shape == (224, 224, 3) and im_aligned.dtype == np.uint8
    assert np.abs(im_aligned.astype(int) - golden_functions[f"align.im_aligned_{face}"]).max() <= 1
    np.testing.assert_allclose(lm_aligned, golden_functions[f"align.lm_aligned_{face}"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(lm5p, golden_functions[f"align.lm5p_{face}"], rtol=1e-6)


@pytest.mark.golden
@pytest.mark.parametrize(("quad", "out"), [("quad", "out"), ("quad2", "out2")])
def test_calc_alignment_matches_golden(golden_functions, quad, out):
    coeffs = calc_alignment_coefficients(
        golden_functions[f"calc_alignment.{quad}"] + 0.5, golden_functions["calc_alignment.target"]
    )
    np.testing.assert_allclose(coeffs, golden_functions[f"calc_alignment.{out}"], rtol=1e-9)


def test_calc_alignment_maps_the_quad_onto_the_crop_corners():
    quad = np.array([[40.3, 30.1], [35.2, 230.8], [241.7, 236.4], [246.9, 25.2]])
    a, b, c, d, e, f, g, h = calc_alignment_coefficients(quad, STIT_CROP_CORNERS_256)
    for (x, y), (u, v) in zip(quad, STIT_CROP_CORNERS_256, strict=True):
        w = g * x + h * y + 1
        assert abs((a * x + b * y + c) / w - u) < 1e-6 and abs((d * x + e * y + f) / w - v) < 1e-6


def _upright_landmarks(scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A symmetric, upright 68-point face: only the points the FFHQ recipe reads are placed precisely."""
    lm = np.zeros((68, 2))
    lm[36:42] = [-30, 0]  # left eye at (-30, 0)
    lm[42:48] = [30, 0]
    lm[48] = [-20, 50]  # mouth corners
    lm[54] = [20, 50]
    lm[30] = [0, 25]
    return lm * scale + shift


def test_ffhq_quad_is_an_upright_square_around_eyes_and_mouth():
    c, x, y = ffhq_quad(_upright_landmarks(shift=(200, 100)))
    # eye distance 60, eye-mouth distance 50: half side = max(2*60, 1.8*50) = 120; centre 10 % towards the mouth
    np.testing.assert_allclose(c, [200, 105])
    np.testing.assert_allclose(x, [120, 0], atol=1e-12)
    np.testing.assert_allclose(y, [0, 120], atol=1e-12)
    quad = quad_from_landmarks(_upright_landmarks(shift=(200, 100)))
    np.testing.assert_allclose(quad, [[80, -15], [80, 225], [320, 225], [320, -15]])


def test_ffhq_quad_follows_head_roll():
    angle = math.radians(20)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    _, x, y = ffhq_quad(_upright_landmarks() @ rot.T)
    np.testing.assert_allclose(x, rot @ [120, 0], atol=1e-9)
    np.testing.assert_allclose(y, rot @ [0, 120], atol=1e-9)


def test_crop_box_of_an_axis_aligned_quad_is_the_quad_plus_half_a_pixel():
    quad = np.array([[100.2, 50.7], [100.2, 250.7], [300.2, 250.7], [300.2, 50.7]])
    assert crop_box(quad, 640, 480) == (100, 51, 300, 251)


def test_crop_box_clamps_the_bottom_with_the_frame_height():
    # Portrait 300x600 frame, a 280-px face: the crop starts 28 px (10 %) above the quad, so the quad's bottom
    # is 308.5 px into the crop; the reference clamps that with the frame WIDTH (300) and cuts the chin (docs/DESIGN.md, deviation 2).
    quad = np.array([[10.0, 100.0], [10.0, 380.0], [290.0, 380.0], [290.0, 100.0]])
    assert crop_box(quad, 300, 600) == (10, 100, 290, 380)
    assert crop_box(quad, 300, 360)[3] == 360  # and it still stops at the frame's bottom edge


@pytest.mark.golden
@pytest.mark.parametrize("face", ["a", "b"])
def test_head_box_of_real_landmarks_holds_the_whole_face(golden_functions, face):
    lm = golden_functions[f"align.lm_fan_{face}"]  # FAN landmarks on a 256x256 Stage-0 crop
    x1, y1, x2, y2 = crop_box(quad_from_landmarks(lm), 256, 256)
    inside = np.clip(lm, 0, 255)
    assert (inside[:, 0] >= x1).all() and (inside[:, 0] < x2).all()
    assert (inside[:, 1] >= y1).all() and (inside[:, 1] < y2).all()
    assert x2 - x1 > 1.5 * np.ptp(lm[:, 0]) or x1 == 0 or x2 == 256  # the head with a margin, not the face


def test_pos_recovers_a_weak_perspective_projection():
    scale, t = 150.0, np.array([120.0, 90.0])
    projected = LM3D_STD[:, :2].astype(np.float64) * scale + t
    t_fit, s_fit = pos(projected, LM3D_STD)
    np.testing.assert_allclose(t_fit, t, atol=1e-4)
    assert abs(s_fit - scale) < 1e-4


def test_align_img_centres_the_face_in_the_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    lm5 = LM3D_STD[:, :2].astype(np.float64) * 100 + [128, 128]  # y-up
    trans_params, im, lm_aligned, lm5p = align_img(img, lm5)
    np.testing.assert_allclose(trans_params[2], 102 / 100, rtol=1e-5)  # s = rescale_factor / POS scale
    np.testing.assert_allclose(trans_params[3:], [128, 128], atol=1e-3)
    np.testing.assert_allclose(lm_aligned.mean(0), LM3D_STD[:, :2].mean(0) * 102 + 112, atol=1.0)
    np.testing.assert_array_equal(lm5p, lm5)
    assert im.shape == (224, 224, 3)


def test_five_points_of_the_68():
    lm = np.arange(136, dtype=np.float64).reshape(68, 2)
    np.testing.assert_array_equal(
        five_points(lm), [(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]]
    )


def test_similarity_transform_recovers_rotation_scale_translation():
    angle, scale, shift = math.radians(12), 1.7, np.array([-33.0, 21.5])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = FACE_TEMPLATE_FFHQ_512.astype(np.float64)
    dst = src @ (scale * rot).T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-5)  # float32 points, as GPEN casts them
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-2)
    mirrored = similarity_transform(src, src * [-1, 1])  # a reflection is never returned
    assert np.linalg.det(mirrored[:, :2]) > 0


def test_gpen_maps_back_with_a_second_fit():
    """GPEN's template -> image map is a second fit with the inverse scale: the inverse matrix up to float32
    round-off (the recorded reference matrices are this fit, bit for bit: test_parity.py)."""
    rng = np.random.default_rng(3)
    points = FACE_TEMPLATE_GPEN_512 * 0.4 + [60, 40] + rng.normal(0, 2, (5, 2))
    forward, backward = gpen_warp_matrices(points, FACE_TEMPLATE_GPEN_512)
    np.testing.assert_allclose(backward, cv2.invertAffineTransform(forward), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.c_[FACE_TEMPLATE_GPEN_512, np.ones(5)] @ backward.T, points, atol=6)


def test_ffhq_quad_keeps_float32_landmarks_arithmetic():
    """FAN's float32 points give a float32 centre (and float64 axes), as the reference's STIT code computes."""
    lm = np.zeros((68, 2), np.float32)
    lm[36:42], lm[42:48], lm[48], lm[54] = [100, 100], [160, 100], [110, 170], [150, 170]
    c, x, y = ffhq_quad(lm)
    assert c.dtype == np.float32 and x.dtype == np.float64 and y.dtype == np.float64
    np.testing.assert_allclose(ffhq_quad(lm.astype(np.float64))[0], c, rtol=1e-6)


def test_gpen_template_matches_the_spec_values():
    spec = [
        (202.041, 242.884),
        (309.430, 242.290),
        (256.077, 303.959),
        (211.960, 366.828),
        (300.891, 366.336),
    ]
    np.testing.assert_allclose(FACE_TEMPLATE_GPEN_512, spec, atol=1e-3)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="68"):
        quad_from_landmarks(np.zeros((5, 2)))
    with pytest.raises(InputError, match="uint8"):
        align_img(np.zeros((64, 64, 3), np.float32), np.zeros((68, 2)))
    with pytest.raises(InputError, match="outside"):
        crop_box(np.array([[900.0, 900.0], [900.0, 950.0], [950.0, 950.0], [950.0, 900.0]]), 640, 480)

"""The torch image operations against their OpenCV counterparts, and the torch render path against the OpenCV
one (CPU tensors: the same code runs on CUDA).

Tolerances: float results within float32 rounding of OpenCV's (3e-5 of a [0, 1] mask after a warp, whose
float32 source positions may round an ulp apart; 1e-3 of a 0..255 image, 5e-3 after a resize, whose float
weights OpenCV rounds its own way). uint8 results at most one grey level apart, on a small fraction of pixels:
where OpenCV rounds a value within float32 error of a half the other way (the warp) or where its scalar code
rounds once and its vector code twice (the resize). pyrDown and erode are exact.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from mediagen import face_image

from retalk.blend import laplacian_pyramid_blend
from retalk.device import autocast
from retalk.engines import neural_steps as steps
from retalk.engines import torch_image as ti
from retalk.engines import torch_steps
from retalk.engines.geometry import FaceGeometry
from retalk.engines.neural import render_faces
from retalk.errors import InputError
from retalk.tracking import track_faces

CPU = torch.device("cpu")
SIZES = [(37, 53), (100, 120), (257, 190)]  # (h, w): odd, even, taller than wide
MATRICES = [
    np.array([[0.9, 0.1, 3.3], [-0.12, 1.1, -2.7]]),  # near identity, partly outside
    np.array([[1.7, 0.3, -20.1], [-0.3, 1.7, -5.5]]),  # enlarging and rotating (crop-like)
    np.array([[0.4, -0.05, 10.0], [0.05, 0.4, 7.0]]),  # shrinking (paste-back-like)
]


def _tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) -> (1, C, H, W)."""
    return torch.from_numpy(
        np.ascontiguousarray(image.transpose(2, 0, 1) if image.ndim == 3 else image[None])
    )[None]


def _array(images: torch.Tensor) -> np.ndarray:
    image = images[0].numpy()
    return image.transpose(1, 2, 0) if image.shape[0] > 1 else image[0]


def _images(h: int, w: int) -> dict[str, np.ndarray]:
    """Noise (the hardest case for interpolation) and a smooth face-like image."""
    rng = np.random.default_rng(h * w)
    face = cv2.resize(face_image(), (w, h))
    return {"noise": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "face": face}


def _assert_uint8_close(got: np.ndarray, want: np.ndarray, fraction: float) -> None:
    error = np.abs(got.astype(int) - want.astype(int))
    assert error.max() <= 1, error.max()
    assert (error > 0).mean() <= fraction, (error > 0).mean()


@pytest.mark.parametrize("h, w", SIZES)
def test_warp_affine_is_cv2_warp_affine(h, w):
    for image in _images(h, w).values():
        mask = image[:, :, 0].astype(np.float32) / 255
        for matrix in MATRICES:
            want = cv2.warpAffine(image, matrix, (90, 80), borderValue=steps.GFPGAN_BORDER)
            got = _array(ti.warp_affine(_tensor(image), matrix[None], (90, 80), steps.GFPGAN_BORDER))
            _assert_uint8_close(got, want, 1e-3)
            got = _array(ti.warp_affine(_tensor(mask), matrix[None], (90, 80)))
            np.testing.assert_allclose(got, cv2.warpAffine(mask, matrix, (90, 80)), rtol=0, atol=3e-5)


def test_warp_affine_batches_its_matrices():
    images = np.stack(list(_images(60, 70).values()))
    matrices = np.stack(MATRICES[:2])
    got = ti.warp_affine(torch.from_numpy(images).permute(0, 3, 1, 2), matrices, (50, 40))
    for k in range(2):
        single = ti.warp_affine(_tensor(images[k]), matrices[k][None], (50, 40))
        torch.testing.assert_close(got[k : k + 1], single, rtol=0, atol=0)
    with pytest.raises(InputError, match="one \\(2, 3\\) matrix per image"):
        ti.warp_affine(_tensor(images[0]), matrices, (50, 40))


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("scale", [(384, 384), (0.4, 0.45), (2.3, 1.1), (0.5, 0.5)])
def test_resize_is_cv2_resize(h, w, scale):
    size = scale if isinstance(scale[0], int) else (max(int(w * scale[0]), 1), max(int(h * scale[1]), 1))
    for image in _images(h, w).values():
        _assert_uint8_close(_array(ti.resize(_tensor(image), size)), cv2.resize(image, size), 0.01)
        values = image.astype(np.float32)
        np.testing.assert_allclose(
            _array(ti.resize(_tensor(values), size)), cv2.resize(values, size), atol=5e-3
        )


@pytest.mark.parametrize("ksize, sigma", [(0, 1), (101, 11), (3, 0), (7, 0), (21, 0)])
def test_gaussian_blur_is_cv2_gaussian_blur(ksize, sigma):
    for h, w in SIZES:
        mask = _images(h, w)["face"][:, :, 1].astype(np.float32) / 255
        want = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
        np.testing.assert_allclose(_array(ti.gaussian_blur(_tensor(mask), ksize, sigma)), want, atol=1e-6)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_erode_is_cv2_erode(k):
    rng = np.random.default_rng(k)
    for h, w in SIZES:
        mask = (rng.random((h, w)) > 0.05).astype(np.float32)
        got = _array(ti.erode(_tensor(mask), (k, k)))
        np.testing.assert_array_equal(got, cv2.erode(mask, np.ones((k, k), np.uint8)))


@pytest.mark.parametrize("h, w", SIZES)
def test_pyramid_steps_are_cv2_pyramid_steps(h, w):
    image = _images(h, w)["noise"]
    np.testing.assert_array_equal(_array(ti.pyr_down(_tensor(image))), cv2.pyrDown(image))
    values = image.astype(np.float32)
    np.testing.assert_allclose(_array(ti.pyr_down(_tensor(values))), cv2.pyrDown(values), atol=1e-4)
    coarse = cv2.pyrDown(values)
    for size in [(w, h), (2 * coarse.shape[1], 2 * coarse.shape[0])]:  # an odd finer level, and twice
        want = cv2.pyrUp(coarse, dstsize=size)
        np.testing.assert_allclose(_array(ti.pyr_up(_tensor(coarse), size)), want, atol=1e-4)
    with pytest.raises(InputError, match="pyr_up of a"):
        ti.pyr_up(_tensor(coarse), (w + 5, h))


@pytest.mark.parametrize("levels", [1, 6, 9])
def test_laplacian_blend_is_the_array_blend(levels):
    h, w = 300, 260
    a, b = _images(h, w)["face"], _images(h, w)["noise"]
    mask = cv2.GaussianBlur((np.arange(w)[None, :] < w // 2).astype(np.float32).repeat(h, 0), (31, 31), 0)
    want = laplacian_pyramid_blend(a, b, mask, levels)
    got = ti.laplacian_pyramid_blend(_tensor(a), _tensor(b), _tensor(mask), levels)
    np.testing.assert_allclose(_array(got), want, atol=1e-3)
    with pytest.raises(InputError, match="pyramid levels do not fit"):
        ti.laplacian_pyramid_blend(_tensor(a[:4, :4]), _tensor(b[:4, :4]), _tensor(mask[:4, :4]), 4)


def test_image_ops_choose_by_device():
    assert torch_steps.image_ops(CPU) == "opencv"
    assert torch_steps.image_ops(torch.device("cuda")) == "torch"
    assert torch_steps.image_ops(torch.device("cuda"), "opencv") == "opencv"
    assert torch_steps.image_ops(CPU, "torch") == "torch"
    with pytest.raises(InputError, match="image_ops 'numpy'"):
        torch_steps.image_ops(CPU, "numpy")


# --- the render path ---------------------------------------------------------------------------------------


def _rule_networks():
    """Stand-ins with some work in them, quick on a CPU: E-Net mixes its reference with the masked face,
    GFPGAN darkens and mirrors its crop, ParseNet labels by colour (mouth where red leads, skin where green
    does, background elsewhere), so every mask and blend of the path has edges."""

    def enet(mel, img_batch, reference, noise):
        return 0.6 * reference + 0.4 * img_batch[:, :3], None

    def gfpgan(x, noise):
        return 0.8 * x.flip(-1)

    def parsenet(x):
        logits = torch.zeros(len(x), 19, *x.shape[2:])
        logits[:, 11] = x[:, 0] - x[:, 1] - 0.05  # mouth
        logits[:, 1] = x[:, 1] - x[:, 2]  # skin
        return logits, None

    return enet, gfpgan, parsenet


@pytest.fixture(scope="module")
def scene():
    """A generated face in a textured 480 x 360 frame, its geometry and reference."""
    rng = np.random.default_rng(3)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), (5, 5), 0)
    frame[52:308, 112:368] = face_image()
    geometry = FaceGeometry.from_track(track_faces([frame]), 480, 360)
    reference = steps.crop_resized(255 - frame, geometry.enet_boxes[0], steps.FACE_SIZE)[None]
    return frame, geometry, reference


@pytest.mark.parametrize("whole_frame", [False, True], ids=["face-area", "whole-frame-512"])
def test_render_faces_torch_path_is_the_opencv_path(scene, whole_frame):
    """The torch path renders what the OpenCV path renders: on average within a tenth of a grey level; a few
    pixels differ more (measured: up to 7 levels on 0.4 % of the values) where a one-level difference flips a
    ParseNet label or the mouth mask's 255 threshold."""
    frame, geometry, reference = scene
    area = (
        steps.whole_frame_512(480, 360) if whole_frame else steps.face_area(geometry.enet_boxes[0], 480, 360)
    )
    rendered = {}
    for ops in ("opencv", "torch"):
        traced = {}
        rendered[ops] = render_faces(
            *_rule_networks(), frame[None], geometry, np.zeros((1, 80, 16)), reference, [], [], [area], CPU,
            trace=lambda name, value, traced=traced: traced.setdefault(name, value), image_ops=ops,
        )  # fmt: skip
        rendered[ops + " traced"] = traced
    assert (rendered["opencv"] != frame).any(axis=3).mean() > 0.05  # the path changed the face
    x1, y1, x2, y2 = area.box
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert (rendered["torch"][0][outside] == frame[outside]).all()
    error = np.abs(rendered["torch"].astype(int) - rendered["opencv"].astype(int))[0, y1:y2, x1:x2]
    print(f"render torch vs opencv: max {error.max()}, mean {error.mean():.4f}, >1: {(error > 1).mean():.2e}")
    assert error.mean() < 0.1 and (error > 2).mean() < 0.01
    for name in ("pred", "gfpgan_pasted", "pp"):  # the trace sees the same arrays
        got, want = rendered["torch traced"][name], rendered["opencv traced"][name]
        assert [np.shape(g) for g in got] == [np.shape(w) for w in want]
        assert np.abs(np.asarray(got[0], int) - np.asarray(want[0], int)).mean() < 0.5


def test_render_faces_torch_path_ignores_autocast(scene):
    """Under the networks' bf16 autocast the image work stays in float32: stand-ins without convolutions
    render exactly what they render without it."""
    frame, geometry, reference = scene
    area = steps.face_area(geometry.enet_boxes[0], 480, 360)
    rendered = []
    for precision in ("fp32", "bf16"):
        with autocast(CPU, precision):
            rendered.append(
                render_faces(
                    *_rule_networks(),
                    frame[None],
                    geometry,
                    np.zeros((1, 80, 16)),
                    reference,
                    [],
                    [],
                    [area],
                    CPU,
                    image_ops="torch",
                )  # fmt: skip
            )
    np.testing.assert_array_equal(rendered[1], rendered[0])

"""Face geometry of the reference pipeline, numpy-2 clean.

- FFHQ oriented quad from 68 landmarks and the head box of the 256 crops (the reference's Croper);
- the perspective coefficients of the STIT paste;
- Deep3DFaceRecon's 5-point POS alignment to the 224x224 face3d input;
- the 5-point similarity transforms onto the 512x512 templates of GPEN and GFPGAN (facexlib).

Landmarks are dlib/FAN 68-point iBUG order, (x, y) image pixels unless a function says "y-up".
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from retalk.errors import InputError

# 5-point 3D template: similarity_Lm3D_all.mat reduced by load_lm3d (left eye, right eye, nose, mouth corners);
# x right, y up. These float32 values are exactly what load_lm3d returns for the BFM file.
LM3D_STD = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032534988, -0.046179324, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    dtype=np.float32,
)

# GPEN: the ArcFace 96x112 five points, made square (x + 8), padded by 25 % on each side (+ 28) and scaled
# from 168 to 512 px, cast to float32 as GPEN's warp_and_crop_face does.
_ARCFACE_96x112 = np.array(
    [
        [30.29459953, 51.69630051],
        [65.53179932, 51.50139999],
        [48.02519989, 71.73660278],
        [33.54930115, 92.3655014],
        [62.72990036, 92.20410156],
    ]
)
FACE_TEMPLATE_GPEN_512 = ((_ARCFACE_96x112 + [8.0, 0.0] + 28.0) * (512.0 / 168.0)).astype(np.float32)
# GFPGAN (facexlib FaceRestoreHelper, face_size 512): the FFHQ five points.
FACE_TEMPLATE_FFHQ_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
# Output corners of the STIT crop (top-left, bottom-left, bottom-right, top-right) at 256 px.
STIT_CROP_CORNERS_256 = np.array([[0.0, 0.0], [0.0, 256.0], [256.0, 256.0], [256.0, 0.0]])


def _check_lm68(lm68: np.ndarray) -> np.ndarray:
    lm68 = np.asarray(lm68)
    if lm68.shape != (68, 2):
        raise InputError(f"expected 68 (x, y) landmarks; got an array of shape {lm68.shape}")
    return lm68


# --- FFHQ quad and the Stage-0 head box ----------------------------------------------------------------


def ffhq_quad(lm68: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre ``c`` and half-axes ``x`` (right) and ``y`` (down) of the FFHQ-recipe square, (2,) each.

    The arithmetic follows the landmarks' dtype as the reference's does: float32 points (FAN's) give a float32
    centre and float64 axes, bit for bit the reference's STIT quads."""
    lm = _check_lm68(lm68)
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (lm[48] + lm[54]) * 0.5 - eye_avg
    # x is the eye line corrected by the eye-mouth axis turned by 90 degrees; y is x turned back.
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return c, x, y


def quad_from_landmarks(lm68: np.ndarray) -> np.ndarray:
    """FFHQ quad (4, 2): top-left, bottom-left, bottom-right, top-right corners."""
    c, x, y = ffhq_quad(lm68)
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def crop_box(quad: np.ndarray, frame_w: int, frame_h: int) -> tuple[int, int, int, int]:
    """The reference Croper's fixed head box (x1, y1, x2, y2) in frame pixels for an FFHQ quad.

    Same arithmetic as ``Croper.align_face`` + ``main`` (10 % border crop, quad + 0.5, truncation), with two
    deliberate deviations (docs/DESIGN.md, deviation 2): the bottom is clamped with the frame HEIGHT (the reference uses the
    width, wrong for portrait frames), and there is no "shrink" step (the reference shrinks the quad for
    faces >= 2048 px but applies the box to the unshrunk frame).
    """
    quad = np.asarray(quad, dtype=np.float64)
    if quad.shape != (4, 2):
        raise InputError(f"expected a (4, 2) quad; got shape {quad.shape}")
    qsize = np.hypot(*(quad[3] - quad[0]))  # side length (= 2|x| of ffhq_quad)
    border = max(int(np.rint(qsize * 0.1)), 3)
    # Left/top of the border-padded crop; its right/bottom edges only ever clamp at the frame, as below.
    clx = max(int(np.floor(quad[:, 0].min())) - border, 0)
    cly = max(int(np.floor(quad[:, 1].min())) - border, 0)
    q = quad - [clx, cly] + 0.5  # crop-relative (the reference skips the shift only when clx = cly = 0)
    lx = max(min(q[0, 0], q[1, 0]), 0)
    ly = max(min(q[0, 1], q[3, 1]), 0)
    rx = min(max(q[2, 0], q[3, 0]), frame_w)
    ry = min(max(q[1, 1], q[2, 1]), frame_h)
    x1, y1 = clx + int(lx), cly + int(ly)
    x2, y2 = min(clx + int(rx), frame_w), min(cly + int(ry), frame_h)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"the face quad lies outside the {frame_w}x{frame_h} frame")
    return x1, y1, x2, y2


def calc_alignment_coefficients(src_quad: np.ndarray, dst_quad: np.ndarray) -> np.ndarray:
    """8 perspective coefficients mapping ``src_quad`` points to ``dst_quad`` points (PIL PERSPECTIVE data).

    Least squares by the normal equations ``inv(A^T A) A^T b``, in this order, as the reference solves it.
    """
    src = np.asarray(src_quad, dtype=np.float64)
    dst = np.asarray(dst_quad, dtype=np.float64)
    rows = []
    for (sx, sy), (dx, dy) in zip(src, dst, strict=True):
        rows.append([sx, sy, 1.0, 0.0, 0.0, 0.0, -dx * sx, -dx * sy])
        rows.append([0.0, 0.0, 0.0, sx, sy, 1.0, -dy * sx, -dy * sy])
    a = np.array(rows)
    return (np.linalg.inv(a.T @ a) @ a.T) @ dst.reshape(8)


# --- Deep3DFaceRecon alignment (face3d input) --------------------------------------------------------


def load_lm3d(mat_path: str | Path) -> np.ndarray:
    """The 5-point 3D template (5, 3) from ``similarity_Lm3D_all.mat`` (68x3, key ``lm``)."""
    try:
        lm = scipy.io.loadmat(str(mat_path))["lm"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            f"{mat_path}: not a readable similarity_Lm3D_all.mat with an 'lm' array ({err})"
        ) from err
    if lm.shape != (68, 3):
        raise InputError(f"{mat_path}: 'lm' has shape {lm.shape}, expected (68, 3)")
    return five_points(lm)


def five_points(lm68: np.ndarray) -> np.ndarray:
    """Left eye, right eye (means of the eye corners 36/39, 42/45), nose tip 30, mouth corners 48, 54."""
    lm68 = np.asarray(lm68)
    return np.stack(
        [
            np.mean(lm68[[36, 39]], 0),
            np.mean(lm68[[42, 45]], 0),
            lm68[30],
            lm68[48],
            lm68[54],
        ]
    )


def pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Weak-perspective fit of 3D points ``x`` (n, 3) to 2D points ``xp`` (n, 2): translation (2,), scale.

    Least squares for two projection rows R1, R2 and (sTx, sTy); the scale is the mean norm of R1 and R2.
    """
    xp = np.asarray(xp, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n = xp.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = x
    a[0::2, 3] = 1
    a[1::2, 4:7] = x
    a[1::2, 7] = 1
    k = np.linalg.lstsq(a, xp.reshape(2 * n), rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(s)


def align_img(
    img_rgb_u8: np.ndarray,
    lm68_yup: np.ndarray,
    lm3d: np.ndarray = LM3D_STD,
    target_size: float = 224.0,
    rescale_factor: float = 102.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deep3DFaceRecon's crop for face3d: scale and shift the face so its 5 points fit the 3D template.

    ``lm68_yup``: (68, 2) landmarks with ``y = H - 1 - y`` (or the 5 points directly, shape (5, 2)).
    Returns ``trans_params`` (5,) float32 [w0, h0, s, tx, ty], the (224, 224, 3) uint8 crop (PIL BICUBIC
    resize of the whole image, then a crop padded with black outside), the landmarks in the crop (y-up) and
    the 5 points used.
    """
    if img_rgb_u8.ndim != 3 or img_rgb_u8.shape[2] != 3 or img_rgb_u8.dtype != np.uint8:
        raise InputError(
            f"align_img needs an (H, W, 3) uint8 RGB image; got {img_rgb_u8.shape} {img_rgb_u8.dtype}"
        )
    lm = np.asarray(lm68_yup)
    if lm.shape not in ((68, 2), (5, 2)):
        raise InputError(f"align_img needs (68, 2) or (5, 2) landmarks; got shape {lm.shape}")
    h0, w0 = img_rgb_u8.shape[:2]
    lm5p = lm if lm.shape[0] == 5 else five_points(lm)

    t, s_pos = pos(lm5p, lm3d)
    s = rescale_factor / s_pos

    # Same truncations as the reference's resize_n_crop_img (float64 arithmetic, int32 truncation).
    w = int(np.int32(w0 * s))
    h = int(np.int32(h0 * s))
    left = int(np.int32(w / 2 - target_size / 2 + (t[0] - w0 / 2) * s))
    up = int(np.int32(h / 2 - target_size / 2 + (h0 / 2 - t[1]) * s))
    size = int(target_size)
    resized = Image.fromarray(img_rgb_u8).resize((w, h), resample=Image.Resampling.BICUBIC)
    im_aligned = np.asarray(resized.crop((left, up, left + size, up + size)))

    lm_aligned = np.stack([lm[:, 0] - t[0] + w0 / 2, lm[:, 1] - t[1] + h0 / 2], axis=1) * s
    lm_aligned = lm_aligned - np.array([w / 2 - target_size / 2, h / 2 - target_size / 2])
    trans_params = np.array([w0, h0, s, t[0], t[1]], dtype=np.float32)
    return trans_params, im_aligned, lm_aligned, lm5p


# --- 5-point similarity transforms onto the 512 templates --------------------------------------------


def _umeyama(src: np.ndarray, dst: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Least-squares similarity (Umeyama 1991) mapping ``src`` to ``dst``: (2, 3) float64 and its scale; with
    ``scale`` given, only rotation and translation are fitted. The arithmetic keeps the points' dtype (GPEN
    passes float32), step for step as GPEN's ``_umeyama``, so the matrices are the reference's bit for bit."""
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise InputError(
            f"similarity_transform needs two (n, 2) point sets, n >= 2; got {src.shape}, {dst.shape}"
        )
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    cov = dst_demean.T @ src_demean / src.shape[0]
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1
    u, singular, v = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise InputError("similarity_transform: the points coincide")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(v) <= 0:
        rotation = u @ np.diag([d[0], -1.0]) @ v
    elif rank == 1:
        rotation = u @ v
    else:
        rotation = u @ np.diag(d) @ v
    if scale is None:
        scale = 1.0 / src_demean.var(axis=0).sum() * (singular @ d)
    matrix = np.empty((2, 3))
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean.T)
    matrix[:, :2] = rotation * scale
    return matrix, scale


def similarity_transform(src5: np.ndarray, dst5: np.ndarray) -> np.ndarray:
    """GPEN's least-squares similarity (rotation, uniform scale, translation) mapping src to dst, (2, 3), with
    the points cast to float32 as ``warp_and_crop_face`` casts them. GFPGAN's facexlib uses
    ``cv2.estimateAffinePartial2D`` with LMEDS instead (:func:`facexlib_affine`)."""
    return _umeyama(np.float32(src5), np.float32(dst5))[0]


def gpen_warp_matrices(points5: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPEN's ``warp_and_crop_face`` matrices for 5 points: image -> template and back. The way back is a
    second fit with the inverse scale, as GPEN computes it: the inverse matrix up to float32 round-off."""
    src, dst = np.float32(points5), np.float32(template)
    forward, scale = _umeyama(src, dst)
    backward, _ = _umeyama(dst, src, scale=1.0 / scale)
    return forward, backward


def facexlib_affine(points5: np.ndarray, template: np.ndarray) -> np.ndarray:
    """facexlib's frame -> template map for GFPGAN: ``cv2.estimateAffinePartial2D`` with LMEDS, (2, 3)."""
    matrix = cv2.estimateAffinePartial2D(np.asarray(points5), np.asarray(template), method=cv2.LMEDS)[0]
    if matrix is None:
        raise InputError("facexlib_affine: no similarity fits these 5 points")
    return matrix

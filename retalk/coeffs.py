"""3DMM coefficient layout and D-Net's driving window.

A row of the per-frame coefficient array ``semantic`` has 262 columns: the 257 outputs of the face3d
network (id 0:80, exp 80:144, tex 144:224, angle 224:227, gamma 227:254, trans 254:257) followed by the
5 ``align_img`` parameters (w0, h0, s, tx, ty at 257:262). D-Net is driven by a (73, 26) window: exp (64),
angle (3), trans (3) and crop (s * ratio, tx, ty) for the 26 frames ``idx-13 .. idx+12`` clamped to the clip.
"""

from __future__ import annotations

import numpy as np

from retalk.errors import InputError

COEFF_WIDTH = 257
SEMANTIC_WIDTH = 262
EXP = slice(80, 144)
ANGLE = slice(224, 227)
TRANS = slice(254, 257)
CROP = slice(259, 262)  # s, tx, ty of align_img
DRIVING_ROWS = 73
WINDOW_BEFORE = 13
WINDOW_AFTER = 12  # asymmetric: the reference's 26-frame window (PIRenderer training used 27)


def split_coeff(coeffs):
    """Split face3d outputs (B, 257) (numpy array or tensor) into the named 3DMM groups, as views."""
    if coeffs.ndim != 2 or coeffs.shape[1] < COEFF_WIDTH:
        raise InputError(f"3DMM coefficients must be (B, {COEFF_WIDTH}); got shape {tuple(coeffs.shape)}")
    return {
        "id": coeffs[:, :80],
        "exp": coeffs[:, EXP],
        "tex": coeffs[:, 144:224],
        "angle": coeffs[:, ANGLE],
        "gamma": coeffs[:, 227:254],
        "trans": coeffs[:, 254:],  # everything from 254 on, as the reference slices it
    }


def window_indices(idx: int, n: int, before: int = WINDOW_BEFORE, after: int = WINDOW_AFTER) -> np.ndarray:
    """Frame indices ``idx-before .. idx+after`` clamped to ``[0, n-1]`` (int64); 26 frames by default."""
    if n < 1:
        raise InputError("the coefficient window needs at least one frame")
    return np.clip(np.arange(idx - before, idx + after + 1, dtype=np.int64), 0, n - 1)


def _check_semantic(semantic: np.ndarray) -> None:
    if semantic.ndim != 2 or semantic.shape[1] != SEMANTIC_WIDTH:
        raise InputError(f"per-frame coefficients must be (N, {SEMANTIC_WIDTH}); got shape {semantic.shape}")


def find_crop_norm_ratio(source_row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The reference's crop-scale normaliser: ``s_source / s_k`` for the row k nearest in exp/angle, shape (1,).

    In the pipeline the source row is always one of ``rows`` (frame idx, or frame 0 for one-shot), so k is the
    source itself and the ratio is exactly 1: the pipeline does not call this (it costs O(N) per frame).
    """
    _check_semantic(source_row)
    _check_semantic(rows)
    exp_diff = np.mean(np.abs(rows[:, EXP] - source_row[:, EXP]), 1)
    angle_diff = np.mean(np.abs(rows[:, ANGLE] - source_row[:, ANGLE]), 1)
    nearest = np.argmin(0.3 * exp_diff + 0.7 * angle_diff)
    return source_row[:, -3] / rows[nearest : nearest + 1, -3]


def transform_semantic(
    semantic: np.ndarray, idx: int, crop_norm_ratio: np.ndarray | float | None = None
) -> np.ndarray:
    """D-Net's coefficient window for frame ``idx``: (73, 26) float32 (rows exp, angle, trans, crop)."""
    _check_semantic(semantic)
    window = semantic[window_indices(idx, semantic.shape[0])]  # fancy indexing copies: semantic is untouched
    crop = window[:, CROP]
    if crop_norm_ratio is not None:
        crop[:, 0] = crop[:, 0] * crop_norm_ratio
    rows = np.concatenate([window[:, EXP], window[:, ANGLE], window[:, TRANS], crop], axis=1)  # (26, 73)
    return np.ascontiguousarray(rows.T, dtype=np.float32)


def dnet_driving_window(semantic: np.ndarray, idx: int, expression64: np.ndarray) -> np.ndarray:
    """:func:`transform_semantic` with the 64 expression rows replaced by a template, for every time step.

    This is what D-Net receives: the frame's own pose, translation and crop with a canonical expression.
    """
    expression64 = np.asarray(expression64).reshape(-1)
    if expression64.shape[0] != 64:
        raise InputError(f"the expression template must have 64 values; got {expression64.shape[0]}")
    driving = transform_semantic(semantic, idx)
    driving[:64] = expression64.astype(np.float32)[:, None]
    return driving

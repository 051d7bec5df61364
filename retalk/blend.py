"""Laplacian pyramid blending with a soft mask: the reference's mouth blend and final face-parse blend."""

from __future__ import annotations

import cv2
import numpy as np

from retalk.errors import InputError


def laplacian_pyramid_blend(a: np.ndarray, b: np.ndarray, mask: np.ndarray, num_levels: int) -> np.ndarray:
    """Blend ``a`` where ``mask`` is 1 with ``b`` where it is 0, band by band; float32, not clipped.

    ``a``, ``b``: (H, W, C) images (uint8 in the pipeline); ``mask``: (H, W) float32 in [0, 1]. The reference's
    arithmetic is kept for parity: the image pyramids are computed in the input dtype (uint8 levels are
    rounded by ``cv2.pyrDown``) and only stored as float32, level 0 stays uint8, the mask pyramid is float32,
    and the reconstruction runs in float32 without clipping. Levels 0..num_levels-1 are used.
    """
    if a.shape != b.shape or a.ndim != 3 or mask.shape != a.shape[:2]:
        raise InputError(
            f"blend inputs must be two (H, W, C) images and an (H, W) mask; got {a.shape}, {b.shape}, {mask.shape}"
        )
    if num_levels < 1 or min(a.shape[:2]) >> (num_levels - 1) < 1:
        raise InputError(f"{num_levels} pyramid levels do not fit a {a.shape[1]}x{a.shape[0]} image")

    level_a, level_b, level_m = a, b, mask.astype(np.float32)
    pyr_a, pyr_b, pyr_m = [level_a], [level_b], [level_m]
    for _ in range(num_levels - 1):
        level_a, level_b, level_m = cv2.pyrDown(level_a), cv2.pyrDown(level_b), cv2.pyrDown(level_m)
        pyr_a.append(level_a.astype(np.float32))
        pyr_b.append(level_b.astype(np.float32))
        pyr_m.append(level_m)

    def band(pyr: list[np.ndarray], k: int) -> np.ndarray:
        finer = pyr[k]
        return np.subtract(
            finer, cv2.pyrUp(pyr[k + 1], dstsize=(finer.shape[1], finer.shape[0])), dtype=np.float32
        )

    def mix(la: np.ndarray, lb: np.ndarray, m: np.ndarray) -> np.ndarray:
        m = m[:, :, None]
        return la * m + lb * (1.0 - m)

    top = num_levels - 1
    out = mix(pyr_a[top], pyr_b[top], pyr_m[top])
    for k in range(top - 1, -1, -1):
        out = cv2.pyrUp(out, dstsize=(pyr_a[k].shape[1], pyr_a[k].shape[0]))
        out = out + mix(band(pyr_a, k), band(pyr_b, k), pyr_m[k])
    return out

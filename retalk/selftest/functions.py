"""Selftest case: the non-network functions against ``golden/functions.npz``.

Covers the mel features (from the stored 16 kHz samples: the resampler is tested by the media tests),
the 3DMM coefficient windows, Laplacian blending, the STIT perspective coefficients and the face3d
alignment. Outputs are keyed by their full golden names (the file has no ``out.`` prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from retalk.align import LM3D_STD, align_img, calc_alignment_coefficients
from retalk.audio import mel_chunks, melspectrogram
from retalk.blend import laplacian_pyramid_blend
from retalk.coeffs import find_crop_norm_ratio, split_coeff, transform_semantic, window_indices

GOLDEN = "functions.npz"
CHECKPOINTS: tuple[str, ...] = ()

# The golden names carry the reference's float fps; the exact rate of examples/face/1.mp4 is 1350/61.
_RATES = {"25": Fraction(25), "22.131147540983605": Fraction(1350, 61)}
_RATIO_FRAMES = (0, 1, 14, 29)

TOLERANCES: dict[str, dict] = {
    "audio.mel_first3s": {"atol": 1e-6},
    "audio.mel_first3s_from_soxr_hq": {"atol": 1e-6},
    **{f"audio.mel_chunks_fps{fps}": {"atol": 1e-6} for fps in _RATES},
    **{f"audio.mel_chunk_starts_fps{fps}": {"exact": True} for fps in _RATES},
    **{f"split_coeff.out_{k}": {"exact": True} for k in ("id", "exp", "tex", "angle", "gamma", "trans")},
    "obtain_seq_index.idx0_n30": {"exact": True},
    "obtain_seq_index.idx29_n30": {"exact": True},
    **{f"find_crop_norm_ratio.idx{i}": {"rtol": 1e-6} for i in _RATIO_FRAMES},
    "find_crop_norm_ratio.external_out": {"rtol": 1e-6},
    **{f"transform_semantic.idx{i}": {"rtol": 1e-6} for i in _RATIO_FRAMES},
    "transform_semantic.idx7_no_ratio": {"rtol": 1e-6},
    "transform_semantic.idx5_external_ratio": {"rtol": 1e-6},
    "laplacian.real_out_levels10": {"atol": 1e-3},
    "laplacian.real_out_levels6": {"atol": 1e-3},
    "laplacian.rand_out_levels10": {"atol": 1e-3},
    "calc_alignment.out": {"rtol": 1e-9},
    "calc_alignment.out2": {"rtol": 1e-9},
    "align.lm3d_std": {"exact": True},
    **{f"align.trans_params_{f}": {"rtol": 1e-6} for f in "ab"},
    **{f"align.im_aligned_{f}": {"max_grey": 1} for f in "ab"},
    **{f"align.lm_aligned_{f}": {"atol": 1e-4, "rtol": 1e-6} for f in "ab"},
    **{f"align.lm5p_{f}": {"rtol": 1e-6} for f in "ab"},
}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    # Audio: mel of the stored 16 kHz samples (both resamplers) and the chunking at both frame rates.
    mel = melspectrogram(golden["audio.wav16k_first3s"])
    out["audio.mel_first3s"] = mel
    out["audio.mel_first3s_from_soxr_hq"] = melspectrogram(golden["audio.wav16k_first3s_soxr_hq"])
    for name, rate in _RATES.items():
        chunks, starts = mel_chunks(mel, rate)
        out[f"audio.mel_chunks_fps{name}"] = chunks
        out[f"audio.mel_chunk_starts_fps{name}"] = starts

    # 3DMM coefficients.
    for name, value in split_coeff(golden["split_coeff.in"]).items():
        out[f"split_coeff.out_{name}"] = value
    for idx in (0, 29):
        out[f"obtain_seq_index.idx{idx}_n30"] = window_indices(idx, 30)
    semantic = golden["semantic.in"]
    for idx in _RATIO_FRAMES:
        ratio = find_crop_norm_ratio(semantic[idx : idx + 1], semantic)
        out[f"find_crop_norm_ratio.idx{idx}"] = ratio
        out[f"transform_semantic.idx{idx}"] = transform_semantic(semantic, idx, ratio)
    out["transform_semantic.idx7_no_ratio"] = transform_semantic(semantic, 7)
    ratio = find_crop_norm_ratio(golden["find_crop_norm_ratio.external_source"], semantic)
    out["find_crop_norm_ratio.external_out"] = ratio
    out["transform_semantic.idx5_external_ratio"] = transform_semantic(semantic, 5, ratio)

    # Laplacian pyramid blending (10 levels: mouth blend; 6 levels: GPEN paste).
    for name, levels in (("real", 10), ("real", 6), ("rand", 10)):
        out[f"laplacian.{name}_out_levels{levels}"] = laplacian_pyramid_blend(
            golden[f"laplacian.{name}_A_u8"],
            golden[f"laplacian.{name}_B_u8"],
            golden[f"laplacian.{name}_mask_f32"],
            levels,
        )

    # Geometry.
    target = golden["calc_alignment.target"]
    out["calc_alignment.out"] = calc_alignment_coefficients(golden["calc_alignment.quad"] + 0.5, target)
    out["calc_alignment.out2"] = calc_alignment_coefficients(golden["calc_alignment.quad2"] + 0.5, target)
    out["align.lm3d_std"] = LM3D_STD
    for face in "ab":
        trans_params, im_aligned, lm_aligned, lm5p = align_img(
            golden[f"align.img_{face}_rgb_u8"], golden[f"align.lm_{face}"], LM3D_STD
        )
        out[f"align.trans_params_{face}"] = trans_params
        out[f"align.im_aligned_{face}"] = im_aligned
        out[f"align.lm_aligned_{face}"] = lm_aligned
        out[f"align.lm5p_{face}"] = lm5p
    return out

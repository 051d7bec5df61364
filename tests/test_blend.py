"""Laplacian pyramid blending against golden/functions.npz (laplacian.*) and its defining properties."""

from __future__ import annotations

import numpy as np
import pytest

from retalk.blend import laplacian_pyramid_blend
from retalk.errors import InputError


@pytest.mark.golden
@pytest.mark.parametrize(("name", "levels"), [("real", 10), ("real", 6), ("rand", 10)])
def test_matches_golden(golden_functions, name, levels):
    data = golden_functions
    a, b = data[f"laplacian.{name}_A_u8"], data[f"laplacian.{name}_B_u8"]
    mask, ref = data[f"laplacian.{name}_mask_f32"], data[f"laplacian.{name}_out_levels{levels}"]
    out = laplacian_pyramid_blend(a, b, mask, levels)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out.astype(np.float64) - ref).max() <= 1e-3


@pytest.mark.parametrize("levels", [1, 4, 7])
def test_constant_masks_give_back_one_image(levels):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    ones = np.ones((96, 128), np.float32)
    np.testing.assert_allclose(laplacian_pyramid_blend(a, b, ones, levels), a, atol=1e-3)
    np.testing.assert_allclose(laplacian_pyramid_blend(a, b, 0 * ones, levels), b, atol=1e-3)


def test_half_mask_takes_each_side_from_its_image():
    a = np.full((64, 64, 3), 200, np.uint8)
    b = np.full((64, 64, 3), 40, np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1
    out = laplacian_pyramid_blend(a, b, mask, 4)
    assert np.abs(out[:, :4] - 200).max() < 1 and np.abs(out[:, -4:] - 40).max() < 1
    assert 40 < out[0, 32, 0] < 200  # a soft seam, not a hard cut


def test_bad_inputs_raise_input_error():
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InputError, match="mask"):
        laplacian_pyramid_blend(a, a, np.zeros((16, 32), np.float32), 3)
    with pytest.raises(InputError, match="levels"):
        laplacian_pyramid_blend(a, a, np.zeros((32, 32), np.float32), 7)

"""3DMM coefficient layout and D-Net's driving window against golden/functions.npz."""

from __future__ import annotations

import numpy as np
import pytest

from retalk.coeffs import (
    dnet_driving_window,
    find_crop_norm_ratio,
    split_coeff,
    transform_semantic,
    window_indices,
)
from retalk.errors import InputError


@pytest.mark.golden
def test_split_coeff_matches_golden(golden_functions):
    groups = split_coeff(golden_functions["split_coeff.in"])
    assert sorted(groups) == ["angle", "exp", "gamma", "id", "tex", "trans"]
    for name, value in groups.items():
        np.testing.assert_array_equal(value, golden_functions[f"split_coeff.out_{name}"])


@pytest.mark.golden
@pytest.mark.parametrize("idx", [0, 29])
def test_window_indices_match_golden(golden_functions, idx):
    np.testing.assert_array_equal(window_indices(idx, 30), golden_functions[f"obtain_seq_index.idx{idx}_n30"])


def test_window_is_26_frames_13_before_12_after():
    window = window_indices(50, 100)
    assert window.tolist() == list(range(37, 63))
    assert window_indices(0, 1).tolist() == [0] * 26


@pytest.mark.golden
@pytest.mark.parametrize("idx", [0, 1, 14, 29])
def test_crop_ratio_and_window_match_golden(golden_functions, idx):
    semantic = golden_functions["semantic.in"]
    ratio = find_crop_norm_ratio(semantic[idx : idx + 1], semantic)
    np.testing.assert_array_equal(ratio, golden_functions[f"find_crop_norm_ratio.idx{idx}"])
    np.testing.assert_array_equal(
        transform_semantic(semantic, idx, ratio), golden_functions[f"transform_semantic.idx{idx}"]
    )


@pytest.mark.golden
def test_external_crop_ratio_and_no_ratio_match_golden(golden_functions):
    semantic = golden_functions["semantic.in"]
    ratio = find_crop_norm_ratio(golden_functions["find_crop_norm_ratio.external_source"], semantic)
    np.testing.assert_array_equal(ratio, golden_functions["find_crop_norm_ratio.external_out"])
    np.testing.assert_array_equal(
        transform_semantic(semantic, 5, ratio), golden_functions["transform_semantic.idx5_external_ratio"]
    )
    np.testing.assert_array_equal(
        transform_semantic(semantic, 7), golden_functions["transform_semantic.idx7_no_ratio"]
    )


def test_crop_ratio_is_one_when_the_source_is_a_row():
    rows = np.random.default_rng(3).normal(size=(12, 262)).astype(np.float32)
    rows[:, 259] = np.abs(rows[:, 259]) + 0.5
    for idx in (0, 5, 11):
        assert find_crop_norm_ratio(rows[idx : idx + 1], rows).tolist() == [1.0]


def test_transform_semantic_layout_and_input_untouched():
    semantic = np.random.default_rng(0).normal(size=(40, 262)).astype(np.float32)
    before = semantic.copy()
    window = transform_semantic(semantic, 20, np.float32(2.0))
    np.testing.assert_array_equal(semantic, before)
    assert window.shape == (73, 26) and window.dtype == np.float32
    frames = np.arange(7, 33)
    np.testing.assert_array_equal(window[:64], semantic[frames, 80:144].T)
    np.testing.assert_array_equal(window[64:67], semantic[frames, 224:227].T)
    np.testing.assert_array_equal(window[67:70], semantic[frames, 254:257].T)
    np.testing.assert_array_equal(window[70], semantic[frames, 259] * np.float32(2.0))
    np.testing.assert_array_equal(window[71:73], semantic[frames, 260:262].T)


def test_dnet_driving_window_replaces_expression_rows_only():
    semantic = np.random.default_rng(1).normal(size=(30, 262)).astype(np.float32)
    template = np.linspace(-1, 1, 64)
    driving = dnet_driving_window(semantic, 3, template)
    np.testing.assert_array_equal(driving[:64], np.repeat(template.astype(np.float32)[:, None], 26, axis=1))
    np.testing.assert_array_equal(driving[64:], transform_semantic(semantic, 3)[64:])


def test_bad_shapes_raise_input_error():
    with pytest.raises(InputError, match="262"):
        transform_semantic(np.zeros((5, 257), np.float32), 0)
    with pytest.raises(InputError, match="64 values"):
        dnet_driving_window(np.zeros((5, 262), np.float32), 0, np.zeros(63))
    with pytest.raises(InputError, match="257"):
        split_coeff(np.zeros((2, 100)))

"""GANimation generator: AU presets, composition, extra entries.

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from retalk.errors import InputError
from retalk.models.ganimation import (
    CHECKPOINT_NAME,
    GANimationGenerator,
    compose_expression,
    expression_aus,
    load_ganimation,
)


def test_expression_presets_match_the_golden_inputs(golden_dir: Path) -> None:
    golden = np.load(golden_dir / "GANimation_gen.npz")  # meta: au = exp_aus_dict['angry'], ['surprise']
    presets = torch.cat([expression_aus("angry"), expression_aus("surprise")]).numpy()
    assert np.array_equal(presets, golden["in.au"])
    assert not expression_aus("sad").any()  # the reference's "sad" is all zeros


def test_unknown_expression_is_an_input_error() -> None:
    with pytest.raises(InputError, match="happy"):
        expression_aus("happy")


def test_compose_keeps_the_face_where_the_mask_is_one() -> None:
    face, color = torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), -1.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out = compose_expression(face, color, mask)
    assert torch.equal(out[..., :2, :], face[..., :2, :])
    assert torch.equal(out[..., 2:, :], color[..., 2:, :])


def test_extra_entries_are_ignored(
    reference_shaped_state_dict: Callable[[str], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save(
        {**reference_shaped_state_dict(CHECKPOINT_NAME), "_metadata_like": torch.zeros(1)}, path
    )  # the reference keeps only the model's keys
    assert isinstance(load_ganimation(path), GANimationGenerator)

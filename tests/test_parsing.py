"""ParseNet: golden logits/labels under the deterministic weights and the face/mouth masks.

Loading and checkpoint errors: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from retalk.models.parsing import (
    CHECKPOINT_NAME,
    FACE_LABELS,
    LABELS,
    MOUTH_LABELS,
    face_region_mask,
)
from retalk.selftest import parsenet as case


@pytest.mark.golden
def test_golden_through_selftest_case(
    reference_state_dict: Callable[[str], dict[str, torch.Tensor]],
    golden_case: Callable[[ModuleType, Path], Mapping[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    torch.save(reference_state_dict(CHECKPOINT_NAME), tmp_path / CHECKPOINT_NAME)
    golden = golden_case(case, tmp_path)
    # the pipeline's use: the face-region mask of the arg-max labels
    mask = face_region_mask(torch.from_numpy(golden["out.out_mask_sub4"]))
    expected = np.isin(golden["out.out_mask_argmax"][:, ::4, ::4], FACE_LABELS)
    assert (mask.numpy() == expected * 255).mean() >= 0.999


def test_label_sets_name_the_face_and_mouth_classes() -> None:
    assert [LABELS[i] for i in MOUTH_LABELS] == ["mouth", "u_lip", "l_lip"]
    assert {LABELS[i] for i in FACE_LABELS}.isdisjoint(
        {"background", "l_ear", "r_ear", "hair", "neck", "cloth"}
    )


def test_face_region_mask_maps_argmax_labels() -> None:
    logits = torch.zeros(1, 19, 1, 4)
    for x, label in enumerate([0, 1, 11, 13]):  # background, skin, upper lip, hair
        logits[0, label, 0, x] = 1.0
    assert face_region_mask(logits).tolist() == [[[0, 255, 255, 0]]]
    assert face_region_mask(logits, MOUTH_LABELS).tolist() == [[[0, 0, 255, 0]]]

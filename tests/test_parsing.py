"""ParseNet: the face/mouth masks, also of the golden labels.

Golden outputs under the deterministic weights: test_golden.py.
Loading and checkpoint errors: test_checkpoint_errors.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retalk.models.parsing import (
    FACE_LABELS,
    LABELS,
    MOUTH_LABELS,
    face_region_mask,
)


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


@pytest.mark.golden
def test_face_region_mask_of_the_golden_labels(golden_dir: Path) -> None:
    # the pipeline's use: the face-region mask of the reference's arg-max labels
    golden = np.load(golden_dir / "ParseNet.npz")
    mask = face_region_mask(torch.from_numpy(golden["out.out_mask_sub4"]))
    expected = np.isin(golden["out.out_mask_argmax"][:, ::4, ::4], FACE_LABELS)
    assert (mask.numpy() == expected * 255).mean() >= 0.999

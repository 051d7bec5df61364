"""ParseNet: golden logits/labels under the deterministic weights, the face/mouth masks, checkpoint errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from retalk.errors import CheckpointError
from retalk.models.parsing import (
    CHECKPOINT_NAME,
    FACE_LABELS,
    LABELS,
    MOUTH_LABELS,
    face_region_mask,
    load_parsenet,
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


def test_checkpoint_errors_name_the_file(
    reference_shaped_state_dict: Callable[[str], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    shaped = reference_shaped_state_dict(CHECKPOINT_NAME)
    path = tmp_path / CHECKPOINT_NAME
    assert load_parsenet(_save(shaped, path)) is not None
    missing = "encoder.1.shortcut_func.conv2d.weight"
    _save({k: v for k, v in shaped.items() if k != missing}, path)
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT_NAME}.*encoder\.1\.shortcut\.conv2d\.weight"):
        load_parsenet(path)
    path.write_bytes(_save(shaped, path).read_bytes()[:4000])
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}.*truncated"):
        load_parsenet(path)
    _save({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, path)  # an S3FD-like file
    with pytest.raises(CheckpointError, match=CHECKPOINT_NAME):
        load_parsenet(path)


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state_dict, path)
    return path

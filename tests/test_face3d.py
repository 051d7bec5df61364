"""face3d ResNet-50 regressor: golden coefficients under the deterministic weights and loud checkpoint errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from retalk.errors import CheckpointError
from retalk.models.face3d import CHECKPOINT_NAME, COEFF_LAYOUT, ReconNet, load_face3d
from retalk.selftest import face3d_recon as case


@pytest.fixture(scope="module")
def shaped_sd(
    reference_shaped_state_dict: Callable[[str], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    return reference_shaped_state_dict(CHECKPOINT_NAME)


@pytest.mark.golden
def test_golden_through_selftest_case(
    reference_state_dict: Callable[[str], dict[str, torch.Tensor]],
    golden_case: Callable[[ModuleType, Path], Mapping[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    torch.save({"net_recon": reference_state_dict(CHECKPOINT_NAME)}, tmp_path / CHECKPOINT_NAME)
    golden_case(case, tmp_path)


def test_official_keys_load_as_is(shaped_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    torch.save({"net_recon": shaped_sd, "optimizer": {"step": torch.zeros(1)}}, tmp_path / "f.pth")
    model = load_face3d(tmp_path / "f.pth")
    assert set(model.state_dict()) == set(shaped_sd)


def test_heads_fill_their_slice_of_the_257_coefficients() -> None:
    model = ReconNet().eval()
    with torch.no_grad():
        for i, head in enumerate(model.final_layers):
            head.weight.zero_()
            head.bias.fill_(float(i))
        out = model(torch.rand(2, 3, 64, 64))
    expected = torch.cat([torch.full((width,), float(i)) for i, (_, width) in enumerate(COEFF_LAYOUT)])
    assert out.shape == (2, 257)
    assert torch.equal(out[1], expected)


def test_truncated_file_is_named(shaped_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"net_recon": shaped_sd}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}.*truncated"):
        load_face3d(path)


def test_another_networks_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "fc6.bias": torch.zeros(1024)}, path)  # S3FD-like
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}.*missing key"):
        load_face3d(path)


def test_missing_and_unexpected_keys_are_reported(shaped_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"net_recon": {k: v for k, v in shaped_sd.items() if k != "final_layers.3.bias"}}, path)
    with pytest.raises(CheckpointError, match=r"final_layers\.3\.bias"):
        load_face3d(path)
    torch.save({"net_recon": {**shaped_sd, "backbone.fc.weight": torch.zeros(257, 2048)}}, path)
    with pytest.raises(CheckpointError, match=r"backbone\.fc\.weight"):  # strict, as the reference
        load_face3d(path)

"""face3d ResNet-50 regressor: the heads, strict loading.

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retalk.errors import CheckpointError
from retalk.models.face3d import CHECKPOINT_NAME, COEFF_LAYOUT, ReconNet, load_face3d

CHECKPOINT = CHECKPOINT_NAME  # the file of the shaped_sd fixture (conftest.py)


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


def test_unexpected_keys_are_refused(shaped_sd: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"net_recon": {**shaped_sd, "backbone.fc.weight": torch.zeros(257, 2048)}}, path)
    with pytest.raises(CheckpointError, match=r"backbone\.fc\.weight"):  # strict, as the reference
        load_face3d(path)

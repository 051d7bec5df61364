"""face3d ResNet-50 regressor: golden coefficients under the deterministic weights and loud checkpoint errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from retalk.errors import CheckpointError
from retalk.models.face3d import CHECKPOINT_NAME, COEFF_LAYOUT, ReconNet, load_face3d
from retalk.selftest import compare
from retalk.selftest import face3d_recon as case


@pytest.fixture(scope="module")
def shaped_sd(reference_manifest: Callable[[str], dict]) -> dict[str, torch.Tensor]:
    """Every official key with its shape, as stride-0 views of one value (a tiny file), for key handling."""
    return {
        key: torch.ones((), dtype=getattr(torch, dtype)).expand(shape)
        for key, shape, dtype, *_ in reference_manifest(CHECKPOINT_NAME)["entries"]
    }


@pytest.mark.golden
def test_golden_through_selftest_case(
    reference_state_dict: Callable[[str], dict[str, torch.Tensor]], golden_dir: Path, tmp_path: Path
) -> None:
    torch.save({"net_recon": reference_state_dict(CHECKPOINT_NAME)}, tmp_path / CHECKPOINT_NAME)
    golden = np.load(golden_dir / case.GOLDEN)
    outputs = case.run(golden, json.loads(str(golden["meta"])), tmp_path, torch.device("cpu"))
    assert set(outputs) == {k.removeprefix("out.") for k in golden.files if k.startswith("out.")}
    for name, got in outputs.items():
        row = compare(golden[f"out.{name}"], got, case.TOLERANCES.get(name))
        assert row.passed, row


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

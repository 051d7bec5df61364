"""Loud checkpoint errors, the same for every network: a missing key, a truncated file, another network's file.

Each row saves the reference-shaped state dict (every official key, all ones) in the network's official
container. What only one network does (extra keys tolerated, unused heads dropped, spectral-norm vectors,
unexpected keys refused) is tested in that network's own file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from official_files import FILES, StateDictFor, save_official
from torch import nn

from retalk.errors import CheckpointError

# (network, another network's official keys, in the network's own container (else in theirs), the message after
# "<network's file>: ")
FOREIGN = [
    ("face3d_pretrain_epoch_20.pth", "s3fd-619a316812.pth", False, r"\d+ missing key"),
    ("30_net_gen.pth", "face3d_pretrain_epoch_20.pth", False, "right file"),
    ("ParseNet-latest.pth", "s3fd-619a316812.pth", False, "right file"),
    ("RetinaFace-R50.pth", "face3d_pretrain_epoch_20.pth", False, "right file"),
    ("s3fd-619a316812.pth", "GFPGANv1.3.pth", False, "right file"),
    ("GFPGANv1.3.pth", "GPEN-BFR-512.pth", True, "right file"),
    ("GPEN-BFR-512.pth", "GFPGANv1.3.pth", True, "right file"),
    ("DNet.pt", "LNet.pth", False, "'net_G_ema'"),
    ("LNet.pth", "DNet.pt", False, "'state_dict'"),
    ("LNet.pth", "ENet.pth", True, r"\d+ missing key"),
    ("ENet.pth", "GFPGANv1.3.pth", True, "right file"),
]


@pytest.mark.parametrize("name", FILES)
def test_missing_key_is_named(name: str, reference_shaped_state_dict: StateDictFor, tmp_path: Path) -> None:
    row, shaped = FILES[name], reference_shaped_state_dict(name)
    assert isinstance(
        row.load(save_official(tmp_path, row, row.wrap(shaped), reference_shaped_state_dict)), nn.Module
    )
    del shaped[row.drop]
    path = save_official(tmp_path, row, row.wrap(shaped), reference_shaped_state_dict)
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(name)}: 1 missing key\(s\): {re.escape(row.reported)};"
    ):
        row.load(path)


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_named(
    name: str, reference_shaped_state_dict: StateDictFor, tmp_path: Path
) -> None:
    row = FILES[name]
    path = save_official(
        tmp_path, row, row.wrap(reference_shaped_state_dict(name)), reference_shaped_state_dict
    )
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"^{re.escape(f'{name}: {path} is truncated')}"):
        row.load(path)


@pytest.mark.parametrize(("name", "other", "own_container", "says"), FOREIGN)
def test_another_networks_file_is_named(
    name: str,
    other: str,
    own_container: bool,
    says: str,
    reference_shaped_state_dict: StateDictFor,
    tmp_path: Path,
) -> None:
    row = FILES[name]
    wrap = row.wrap if own_container else FILES[other].wrap
    path = save_official(tmp_path, row, wrap(reference_shaped_state_dict(other)), reference_shaped_state_dict)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(name)}: .*{says}"):
        row.load(path)

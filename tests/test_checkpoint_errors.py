"""Loud checkpoint errors, the same for every network: a missing key, a truncated file, another network's file;
and files that carry training state beside the weights, which load without running anything from the file.

Each row saves the reference-shaped state dict (every official key, all ones) in the network's official
container. What only one network does (extra keys tolerated, unused heads dropped, spectral-norm vectors,
unexpected keys refused) is tested in that network's own file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from official_files import FILES, StateDictFor, save_official
from torch import nn

from retalk.errors import CheckpointError
from retalk.models.checkpoint import SkippedObject, load_torch_file, read_checkpoint

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


# --- files that carry training state beside the weights ------------------------------------------------------


class TrainingState:
    """A class of the training code, unknown to retalk: the loader must skip it without importing anything."""

    def __init__(self) -> None:
        self.step = 1234


class RunsCode:
    """An object whose unpickling would run ``touch <marker>``: a tampered file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _training_state() -> dict:
    return {
        "epoch": np.int64(20),  # a numpy scalar
        "loss": np.float32(0.25),
        "args": argparse.Namespace(lr=1e-4, batch_size=16),
        "trainer": TrainingState(),
        "history": np.arange(4.0),
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
    }


CONTAINERS = [name for name, row in FILES.items() if row.wrap({})]  # the files whose weights sit under a key


@pytest.mark.parametrize("name", CONTAINERS)
def test_training_state_beside_the_weights_is_skipped(
    name: str, reference_shaped_state_dict: StateDictFor, tmp_path: Path
) -> None:
    row = FILES[name]
    content = {**row.wrap(reference_shaped_state_dict(name)), **_training_state()}
    path = save_official(tmp_path, row, content, reference_shaped_state_dict)
    with pytest.raises(pickle.UnpicklingError):  # what a plain weights-only load makes of such a file
        torch.load(path, weights_only=True)
    assert isinstance(row.load(path), nn.Module)


@pytest.mark.parametrize("zip_format", [True, False])
def test_skipped_objects_leave_the_weights_exact(tmp_path: Path, zip_format: bool) -> None:
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    path = tmp_path / "LNet.pth"
    torch.save({"state_dict": weights, **_training_state()}, path, _use_new_zipfile_serialization=zip_format)
    loaded = read_checkpoint(path, name="LNet.pth", container_keys=("state_dict",))
    assert loaded.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(loaded[key], tensor)
    everything = load_torch_file(path, name="LNet.pth")
    assert isinstance(everything["args"], SkippedObject) and everything["args"].origin == "argparse.Namespace"
    assert isinstance(everything["trainer"], SkippedObject)
    assert everything["trainer"].origin.endswith("TrainingState") and not hasattr(
        everything["trainer"], "step"
    )


def test_weights_that_are_themselves_a_foreign_object_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "LNet.pth"
    torch.save({"state_dict": argparse.Namespace(lr=1e-4), "epoch": np.int64(3)}, path)
    with pytest.raises(
        CheckpointError,
        match=r"^LNet\.pth: .* holds a argparse\.Namespace object under 'state_dict' where the weights should be",
    ):
        read_checkpoint(path, name="LNet.pth", container_keys=("state_dict",))
    torch.save({"state_dict": {"w": torch.zeros(2), "seen": np.float64(1.0)}}, path)
    with pytest.raises(CheckpointError, match=r"^LNet\.pth: .* does not hold 'state_dict' of tensors"):
        read_checkpoint(path, name="LNet.pth", container_keys=("state_dict",))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("where", ["beside", "inside"])
def test_a_file_that_would_run_code_is_refused_and_runs_nothing(
    tmp_path: Path, zip_format: bool, where: str
) -> None:
    marker = tmp_path / "ran"
    weights = {"w": torch.zeros(2)}
    content = (
        {"state_dict": weights, "hook": RunsCode(marker)}
        if where == "beside"
        else {"state_dict": {**weights, "v": RunsCode(marker)}}
    )
    path = tmp_path / "LNet.pth"
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        CheckpointError, match=r"^LNet\.pth: .* refers to (posix|nt|os)\.system, which no checkpoint"
    ):
        read_checkpoint(path, name="LNet.pth", container_keys=("state_dict",))
    assert not marker.exists()


def test_a_damaged_pickle_is_reported_as_damaged_not_as_extra_objects(tmp_path: Path) -> None:
    path = tmp_path / "LNet.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pickled = next(m for m in members if m.endswith("data.pkl"))
    members[pickled] = b"\x80\x02}q\x00(X\x01\x00\x00\x00w\xff\xfe garbage"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    with pytest.raises(CheckpointError, match=r"^LNet\.pth: .* is truncated or not a PyTorch checkpoint"):
        read_checkpoint(path, name="LNet.pth", container_keys=("state_dict",))

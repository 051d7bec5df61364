"""Every network's golden outputs under the reference's deterministic weights, through its ``retalk.selftest`` case.

Each case's checkpoint files are written in their official containers (official_files.py), except where a row
below names another layout the loader must also accept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from official_files import FILES, StateDictFor, save_official
from torch import Tensor

from retalk.selftest.cases import CASES as SELFTEST_CASES
from retalk.selftest.cases import Case


def _data_parallel(state_dict: dict[str, Tensor]) -> object:
    # the reference's RetinaFace container: 'state_dict' with DataParallel's 'module.' prefix, both optional
    return {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}


# (selftest case, the container of its first checkpoint file; None: the official one)
CASES = [
    (SELFTEST_CASES["face3d_recon.npz"], None),
    (SELFTEST_CASES["GANimation_gen.npz"], None),
    (SELFTEST_CASES["ParseNet.npz"], None),
    (SELFTEST_CASES["RetinaFace-R50.npz"], _data_parallel),
    (SELFTEST_CASES["S3FD.npz"], None),
    (SELFTEST_CASES["GFPGANv1.3.npz"], None),
    (SELFTEST_CASES["GPEN-BFR-512.npz"], None),
    (SELFTEST_CASES["DNet.npz"], None),
    (SELFTEST_CASES["LNet.npz"], None),
    (
        SELFTEST_CASES["ENet.npz"],
        None,
    ),  # ENet.pth holds E-Net's own keys; its L-Net comes from LNet.pth beside it
]


@pytest.mark.golden
@pytest.mark.parametrize(("case", "wrap"), CASES, ids=[case.checkpoints[0] for case, _ in CASES])
def test_golden_through_selftest_case(
    case: Case,
    wrap: Callable[[dict[str, Tensor]], object] | None,
    reference_state_dict: StateDictFor,
    golden_case: Callable[[Case, Path], Mapping[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    name, *beside = case.checkpoints
    row = FILES[name]
    assert tuple(beside) == row.beside  # the case reads exactly the files the table says its loader reads
    save_official(tmp_path, row, (wrap or row.wrap)(reference_state_dict(name)), reference_state_dict)
    golden_case(case, tmp_path)

"""Every network's golden outputs under the reference's deterministic weights, through its ``retalk.selftest`` case.

Each case's checkpoint files are written in their official containers (official_files.py), except where a row
below names another layout the loader must also accept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from official_files import FILES, StateDictFor, save_official
from torch import Tensor

from retalk.selftest import (
    dnet,
    enet,
    face3d_recon,
    ganimation_gen,
    gfpganv1_3,
    gpen_bfr_512,
    lnet,
    parsenet,
    retinaface_r50,
    s3fd,
)


def _data_parallel(state_dict: dict[str, Tensor]) -> object:
    # the reference's RetinaFace container: 'state_dict' with DataParallel's 'module.' prefix, both optional
    return {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}


# (selftest case, the container of its first checkpoint file; None: the official one)
CASES = [
    (face3d_recon, None),
    (ganimation_gen, None),
    (parsenet, None),
    (retinaface_r50, _data_parallel),
    (s3fd, None),
    (gfpganv1_3, None),
    (gpen_bfr_512, None),
    (dnet, None),
    (lnet, None),
    (enet, None),  # ENet.pth holds E-Net's own keys; the embedded L-Net comes from LNet.pth beside it
]


@pytest.mark.golden
@pytest.mark.parametrize(("case", "wrap"), CASES, ids=[case.CHECKPOINTS[0] for case, _ in CASES])
def test_golden_through_selftest_case(
    case: ModuleType,
    wrap: Callable[[dict[str, Tensor]], object] | None,
    reference_state_dict: StateDictFor,
    golden_case: Callable[[ModuleType, Path], Mapping[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    name, *beside = case.CHECKPOINTS
    row = FILES[name]
    assert tuple(beside) == row.beside  # the case reads exactly the files the table says its loader reads
    save_official(tmp_path, row, (wrap or row.wrap)(reference_state_dict(name)), reference_state_dict)
    golden_case(case, tmp_path)

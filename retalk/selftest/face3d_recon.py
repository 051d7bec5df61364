"""Selftest case: Deep3DFaceRecon's ResNet-50 regressor against ``face3d_recon.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.face3d import CHECKPOINT_NAME, load_face3d

GOLDEN = "face3d_recon.npz"
CHECKPOINTS = (CHECKPOINT_NAME,)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    model = load_face3d(Path(checkpoints) / CHECKPOINT_NAME, device)
    with torch.inference_mode():
        coeffs = model(torch.from_numpy(golden["in.x"]).to(device))
    return {"coeffs": coeffs.float().cpu().numpy()}

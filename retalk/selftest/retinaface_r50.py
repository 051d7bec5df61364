"""Selftest case: GPEN's RetinaFace-ResNet50 against ``RetinaFace-R50.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.retinaface import CHECKPOINT_NAME, load_retinaface

GOLDEN = "RetinaFace-R50.npz"
CHECKPOINTS = (CHECKPOINT_NAME,)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    model = load_retinaface(Path(checkpoints) / CHECKPOINT_NAME, device)
    with torch.inference_mode():
        loc, conf, landmarks = model(torch.from_numpy(golden["in.x"]).to(device))
    return {
        name: t.float().cpu().numpy() for name, t in (("loc", loc), ("conf", conf), ("landms", landmarks))
    }

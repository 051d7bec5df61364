"""Selftest case: GPEN-BFR-512 through its real loader against ``golden/GPEN-BFR-512.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.gpen import load_gpen

GOLDEN = "GPEN-BFR-512.npz"
CHECKPOINTS = ("GPEN-BFR-512.pth",)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    """``FullGenerator(x)[0]`` of the reference: GPEN is deterministic (its noise is its own encoder features)."""
    model = load_gpen(Path(checkpoints) / "GPEN-BFR-512.pth", device=device)
    x = torch.from_numpy(golden["in.x"]).to(device)
    with torch.inference_mode():
        image = model(x)
    return {"image": image.float().cpu().numpy()}

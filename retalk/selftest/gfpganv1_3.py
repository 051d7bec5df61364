"""Selftest case: GFPGAN v1.3 (clean) through its real loader against ``golden/GFPGANv1.3.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.gfpgan import load_gfpgan

GOLDEN = "GFPGANv1.3.npz"
CHECKPOINTS = ("GFPGANv1.3.pth",)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    """``GFPGANv1Clean(x)`` with the stored noise buffers (the reference's ``randomize_noise=False``)."""
    model = load_gfpgan(Path(checkpoints) / "GFPGANv1.3.pth", device=device)
    x = torch.from_numpy(golden["in.x"]).to(device)
    with torch.inference_mode():
        image = model(x)
    return {"image": image.float().cpu().numpy()}

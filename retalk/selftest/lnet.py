"""Selftest case: L-Net through its real loader against ``golden/LNet.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.lnet import load_lnet

GOLDEN = "LNet.npz"
CHECKPOINTS = ("LNet.pth",)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    """``LNet(mel, face)`` on the golden inputs (contiguous NCHW; the reference's strides move ≤ 2.3e-5)."""
    model = load_lnet(Path(checkpoints) / "LNet.pth", device=device)
    mel = torch.from_numpy(golden["in.mel"]).to(device)
    face = torch.from_numpy(golden["in.face"]).to(device)
    with torch.inference_mode():
        out = model(mel, face)
    return {"out": out.float().cpu().numpy()}

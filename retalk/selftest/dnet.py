"""Selftest case: D-Net through its real loader against ``golden/DNet.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.dnet import load_dnet

GOLDEN = "DNet.npz"
CHECKPOINTS = ("DNet.pt",)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    """``DNet(input_image, driving_source)``: flow_field, warp_image and fake_image."""
    model = load_dnet(Path(checkpoints) / "DNet.pt", device=device)
    image = torch.from_numpy(golden["in.input_image"]).to(device)
    coeffs = torch.from_numpy(golden["in.driving_source"]).to(device)
    with torch.inference_mode():
        out = model(image, coeffs)
    return {name: tensor.float().cpu().numpy() for name, tensor in out.items()}

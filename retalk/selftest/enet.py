"""Selftest case: E-Net (with its L-Net) through the real loader against ``golden/ENet.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.enet import load_enet
from retalk.synthetic import noise_tensor

GOLDEN = "ENet.npz"
CHECKPOINTS = ("ENet.pth", "LNet.pth")
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    """``ENet(mel, img_batch, img_batch[:, 3:])`` with the explicit noise maps ``meta['noise']`` names."""
    checkpoints = Path(checkpoints)
    model = load_enet(checkpoints / "ENet.pth", checkpoints / "LNet.pth", device=device)
    noise = [
        noise_tensor(name, shape).to(device)
        for name, shape in zip(meta["noise"]["names"], meta["noise"]["shapes"], strict=True)
    ]
    mel = torch.from_numpy(golden["in.mel"]).to(device)
    img_batch = torch.from_numpy(golden["in.img_batch"]).to(device)
    with torch.inference_mode():
        pred, low_res = model(mel, img_batch, img_batch[:, 3:], noise=noise)
    return {"pred": pred.float().cpu().numpy(), "low_res": low_res.float().cpu().numpy()}

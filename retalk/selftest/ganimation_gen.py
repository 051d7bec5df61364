"""Selftest case: GANimation's split generator against ``GANimation_gen.npz``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.ganimation import CHECKPOINT_NAME, compose_expression, load_ganimation

GOLDEN = "GANimation_gen.npz"
CHECKPOINTS = (CHECKPOINT_NAME,)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    model = load_ganimation(Path(checkpoints) / CHECKPOINT_NAME, device)
    face = torch.from_numpy(golden["in.img"]).to(device)
    with torch.inference_mode():
        color, mask, features = model(face, torch.from_numpy(golden["in.au"]).to(device))
        fake = compose_expression(face, color, mask)
    return {
        "color_mask": color.float().cpu().numpy(),
        "aus_mask": mask.float().cpu().numpy(),
        "embed_sub4": features[:, :, ::4, ::4].float().cpu().numpy(),
        "embed_chan_sum": features.double().sum(dim=(2, 3)).cpu().numpy(),
        "fake_img": fake.float().cpu().numpy(),
    }

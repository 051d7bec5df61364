"""Selftest case: S3FD against ``S3FD.npz``, whose input is stored as BGR frames (the reference reverses them
to RGB before subtracting the BGR means, §9.3)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.s3fd import CHECKPOINT_NAME, load_s3fd, prepare_batch

GOLDEN = "S3FD.npz"
CHECKPOINTS = (CHECKPOINT_NAME,)
TOLERANCES: dict[str, dict] = {}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    model = load_s3fd(Path(checkpoints) / CHECKPOINT_NAME, device)
    x = prepare_batch(golden["in.frames_bgr_u8"][..., ::-1], feed="rgb").to(device)
    with torch.inference_mode():
        outputs = model(x)
    names = [f"{kind}{level}" for level in range(1, 7) for kind in ("cls", "reg")]
    return {name: t.float().cpu().numpy() for name, t in zip(names, outputs, strict=True)}

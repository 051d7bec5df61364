"""Selftest case: GPEN's ParseNet against ``ParseNet.npz`` (logits stored sub-sampled, plus the label map)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retalk.models.parsing import CHECKPOINT_NAME, load_parsenet

GOLDEN = "ParseNet.npz"
CHECKPOINTS = (CHECKPOINT_NAME,)
# Near-ties between two labels may flip under float reordering (README: >= 99.9 % equal pixels).
TOLERANCES: dict[str, dict] = {"out_mask_argmax": {"min_equal": 0.999}}


def run(
    golden: Mapping[str, np.ndarray], meta: dict, checkpoints: Path, device: torch.device
) -> dict[str, np.ndarray]:
    model = load_parsenet(Path(checkpoints) / CHECKPOINT_NAME, device)
    with torch.inference_mode():
        logits, image = model(torch.from_numpy(golden["in.x"]).to(device))
    return {
        "out_mask_sub4": logits[:, :, ::4, ::4].float().cpu().numpy(),
        "out_mask_window": logits[:, :, 192:256, 256:320].float().cpu().numpy(),
        "out_mask_argmax": logits.argmax(dim=1).to(torch.uint8).cpu().numpy(),
        "out_mask_chan_sum": logits.double().sum(dim=(2, 3)).cpu().numpy(),
        "out_img": image.float().cpu().numpy(),
    }

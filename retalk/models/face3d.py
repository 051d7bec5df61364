"""Deep3DFaceRecon's coefficient regressor (its official epoch-20 checkpoint): ResNet-50 -> 257 3DMM numbers.

The backbone is torchvision's ResNet-50 without its classifier; seven 1x1 conv heads on the pooled 2048-d
feature give identity 80, expression 64, texture 80, angles 3, SH lighting 27, translation xy 2 and z 1,
concatenated in that order (the order the reference splits the coefficient row in). The official key names
are already those of this module (``backbone.*`` in torchvision layout, ``final_layers.<i>.*``), so the
filter only selects tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from retalk.checkpoints.catalogue import FACE3D as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint

# (name, width) of the heads in output order; the widths sum to 257.
COEFF_LAYOUT: tuple[tuple[str, int], ...] = (
    ("id", 80),
    ("exp", 64),
    ("tex", 80),
    ("angle", 3),
    ("gamma", 27),
    ("trans_xy", 2),
    ("trans_z", 1),
)


class ReconNet(nn.Module):
    """(B, 3, 224, 224) RGB in [0, 1] (no mean/std) -> (B, 257) coefficients."""

    feature_dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50(weights=None)
        self.backbone.fc = nn.Identity()  # the checkpoint has no classifier
        self.final_layers = nn.ModuleList(nn.Conv2d(self.feature_dim, width, 1) for _, width in COEFF_LAYOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.backbone(x)[:, :, None, None]  # [B, 3, 224, 224] -> [B, 2048, 1, 1]
        return torch.cat([head(feature) for head in self.final_layers], dim=1).flatten(1)  # -> [B, 257]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ReconNet) -> dict[str, torch.Tensor]:
    """Official ``net_recon`` keys equal the module's own; nothing to rename."""
    return dict(state_dict)


def load_face3d(path: str | Path, device: torch.device | str = "cpu") -> ReconNet:
    """Build :class:`ReconNet` from its official file (``['net_recon']``, strict as the reference)."""
    state_dict = read_checkpoint(path, name=CHECKPOINT_NAME, container_keys=("net_recon",))
    return build_checked(ReconNet, state_dict, checkpoint_filter_fn, name=CHECKPOINT_NAME, device=device)[0]

"""GANimation's split generator: the optional upper-face expression edit (docs/DESIGN.md, deviation 8).

The face (B, 3, 128, 128) in [-1, 1] is concatenated with 17 action-unit intensities broadcast over the
image, encoded by a 7x7 conv and two stride-2 convs, six residual blocks and two transposed convs (instance
norm without affine or running stats, ReLU), then two 7x7 heads: a colour image (tanh) and an attention
mask (sigmoid). The edited face is ``mask * face + (1 - mask) * colour`` (:func:`compose_expression`).
The reference feeds the face in **BGR** order; the network does not care which order it is given, but the
official weights were used that way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from retalk.checkpoints.catalogue import GANIMATION as CHECKPOINT_NAME
from retalk.errors import InputError
from retalk.models.checkpoint import build_checked, read_checkpoint

# Action units in the network's input order (OpenFace intensity names).
ACTION_UNITS = (
    "AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12",
    "AU14", "AU15", "AU17", "AU20", "AU23", "AU25", "AU26", "AU45",
)  # fmt: skip

# The reference's targets (``exp_aus_dict``): "sad" is all zeros, i.e. no action unit at all.
EXPRESSION_AUS: dict[str, dict[str, float]] = {
    "sad": {},
    "angry": {"AU04": 0.3},
    "surprise": {"AU05": 0.2},
}


def expression_aus(name: str) -> torch.Tensor:
    """The (1, 17) action-unit vector of a named upper-face expression ("sad", "angry", "surprise")."""
    if name not in EXPRESSION_AUS:
        raise InputError(f"upper-face expression {name!r}: expected one of {', '.join(EXPRESSION_AUS)}")
    aus = torch.zeros(1, len(ACTION_UNITS))
    for unit, value in EXPRESSION_AUS[name].items():
        aus[0, ACTION_UNITS.index(unit)] = value
    return aus


def _conv_norm_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.InstanceNorm2d(channels, affine=False, track_running_stats=False), nn.ReLU(inplace=True)]


class ResnetBlock(nn.Module):
    """x + (conv3x3, IN, ReLU, conv3x3, IN)(x), zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            *_conv_norm_relu(nn.Conv2d(channels, channels, 3, padding=1), channels),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels, affine=False, track_running_stats=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class GANimationGenerator(nn.Module):
    """(face (B, 3, 128, 128) in [-1, 1], aus (B, 17)) -> (colour (B,3,H,W), mask (B,1,H,W), features (B,64,H,W))."""

    def __init__(
        self, image_channels: int = 3, num_aus: int = 17, width: int = 64, num_blocks: int = 6
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_norm_relu(nn.Conv2d(image_channels + num_aus, width, 7, padding=3), width),
            *_conv_norm_relu(nn.Conv2d(width, width * 2, 4, stride=2, padding=1), width * 2),
            *_conv_norm_relu(nn.Conv2d(width * 2, width * 4, 4, stride=2, padding=1), width * 4),
        )
        self.blocks = nn.Sequential(*(ResnetBlock(width * 4) for _ in range(num_blocks)))
        self.decoder = nn.Sequential(
            *_conv_norm_relu(nn.ConvTranspose2d(width * 4, width * 2, 4, stride=2, padding=1), width * 2),
            *_conv_norm_relu(nn.ConvTranspose2d(width * 2, width, 4, stride=2, padding=1), width),
        )
        self.color_head = nn.Conv2d(width, image_channels, 7, padding=3, bias=False)
        self.mask_head = nn.Conv2d(width, 1, 7, padding=3, bias=False)

    def forward(
        self, face: torch.Tensor, aus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = face.shape
        aus_map = aus[:, :, None, None].expand(b, aus.shape[1], h, w)
        x = self.encoder(torch.cat([face, aus_map], dim=1))  # [B, 20, 128, 128] -> [B, 256, 32, 32]
        x = self.blocks(x)
        features = self.decoder(x)  # -> [B, 64, 128, 128]
        return torch.tanh(self.color_head(features)), torch.sigmoid(self.mask_head(features)), features


def compose_expression(face: torch.Tensor, color: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The edited face: attention ``mask`` keeps the input, ``1 - mask`` takes the generated colour."""
    return mask * face + (1 - mask) * color


# Official ``model.<i>`` index -> this module's (part, first index of that part) in the reference Sequential.
_PARTS = (("encoder", 0, 9), ("blocks", 9, 15), ("decoder", 15, 21))


def _rename(key: str) -> str:
    if key.startswith("color_top.0."):
        return "color_head." + key.removeprefix("color_top.0.")
    if key.startswith("au_top.0."):
        return "mask_head." + key.removeprefix("au_top.0.")
    match = re.match(r"model\.(\d+)\.(.*)", key)
    if match:
        index = int(match.group(1))
        for part, start, stop in _PARTS:
            if start <= index < stop:
                return f"{part}.{index - start}.{match.group(2)}"
    return key


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: GANimationGenerator
) -> dict[str, torch.Tensor]:
    """Official SplitGenerator keys (``model.<i>``, ``color_top.0``, ``au_top.0``) -> this module's names."""
    return {_rename(k): v for k, v in state_dict.items()}


def load_ganimation(path: str | Path, device: torch.device | str = "cpu") -> GANimationGenerator:
    """Build the generator from its official file: a plain state dict; extra entries are ignored, as in the
    reference (it keeps only the model's keys, then loads strictly)."""
    state_dict = read_checkpoint(path, name=CHECKPOINT_NAME)
    model, _ = build_checked(
        GANimationGenerator,
        state_dict,
        checkpoint_filter_fn,
        name=CHECKPOINT_NAME,
        allow_unexpected=True,
        device=device,
    )
    return model

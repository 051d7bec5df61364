"""GPEN's face parser ParseNet: 19-class face segmentation at 512x512.

Encoder (a 3x3 conv, four down-sampling residual blocks 512 -> 32), ten residual blocks with a long skip,
decoder (four nearest-up residual blocks), then two 3x3 heads: 19 label logits and a 3-channel image. All
convs reflection-pad; block convs use BatchNorm + LeakyReLU(0.2); channels are clipped to [32, 256].
It serves twice: GPEN's face-parse paste and the mouth mask of the lip blend. Input: (B, 3, 512, 512)
**RGB** in [-1, 1]. The pipeline only uses ``argmax`` of the logits, mapped to a face-region mask by
:func:`face_region_mask`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from retalk.checkpoints.catalogue import PARSENET as CHECKPOINT_NAME
from retalk.device import channels_last
from retalk.models.checkpoint import build_checked, read_checkpoint

LABELS = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
# Label sets the reference maps to 255: GPEN's face region for its paste (skin .. brows, mouth, lips; no ears)
# and the mouth mask of the lip blend (mouth interior and lips).
FACE_LABELS = (1, 2, 3, 4, 5, 6, 7, 10, 11, 12)
MOUTH_LABELS = (10, 11, 12)


class ConvLayer(nn.Module):
    """[nearest x2] -> reflection pad -> conv (stride 2 when down) -> [BatchNorm] -> [LeakyReLU 0.2]."""

    def __init__(
        self, cin: int, cout: int, *, scale: str = "none", norm: bool = False, act: bool = False
    ) -> None:
        super().__init__()
        self.upsample = scale == "up"
        self.conv2d = nn.Conv2d(cin, cout, 3, stride=2 if scale == "down" else 1, bias=not norm)
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(self.norm(self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))))


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(conv1(x)); the shortcut is a plain conv when the scale or width changes."""

    def __init__(self, cin: int, cout: int, scale: str = "none") -> None:
        super().__init__()
        self.shortcut = ConvLayer(cin, cout, scale=scale) if scale != "none" or cin != cout else nn.Identity()
        self.conv1 = ConvLayer(cin, cout, scale="up" if scale == "up" else "none", norm=True, act=True)
        self.conv2 = ConvLayer(cout, cout, scale="down" if scale == "down" else "none", norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """(B, 3, 512, 512) RGB in [-1, 1] -> (label logits (B, 19, 512, 512), image (B, 3, 512, 512))."""

    def __init__(
        self,
        size: int = 512,
        min_feat_size: int = 32,
        base_ch: int = 64,
        num_labels: int = 19,
        res_depth: int = 10,
        ch_range: tuple[int, int] = (32, 256),
    ) -> None:
        super().__init__()

        def clip(ch: int) -> int:
            return max(ch_range[0], min(ch, ch_range[1]))

        steps = (size // min_feat_size).bit_length() - 1  # log2(512 / 32) = 4
        encoder: list[nn.Module] = [ConvLayer(3, base_ch)]
        ch = base_ch
        for _ in range(steps):
            encoder.append(ResidualBlock(clip(ch), clip(ch * 2), scale="down"))
            ch *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*(ResidualBlock(clip(ch), clip(ch)) for _ in range(res_depth)))
        decoder = []
        for _ in range(steps):
            decoder.append(ResidualBlock(clip(ch), clip(ch // 2), scale="up"))
            ch //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(clip(ch), 3)
        self.out_mask_conv = ConvLayer(clip(ch), num_labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(x)  # [B, 3, 512, 512] -> [B, 256, 32, 32]
        x = self.decoder(feat + self.body(feat))  # -> [B, 64, 512, 512]
        return self.out_mask_conv(x), self.out_img_conv(x)


def face_region_mask(logits: torch.Tensor, labels: Sequence[int] = FACE_LABELS) -> torch.Tensor:
    """(B, 19, H, W) logits -> (B, H, W) uint8 mask, 255 where the arg-max label is in ``labels``."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[list(labels)] = True
    return keep[logits.argmax(dim=1)].to(torch.uint8) * 255


def _rename(key: str) -> str:
    # Official blocks hold ``shortcut_func.conv2d``, ``convN.conv2d`` and ``convN.norm.norm``.
    return key.replace("shortcut_func.", "shortcut.").replace(".norm.norm.", ".norm.")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ParseNet) -> dict[str, torch.Tensor]:
    """Official keys -> this module's (``shortcut_func`` -> ``shortcut``, ``norm.norm`` -> ``norm``)."""
    return {_rename(k): v for k, v in state_dict.items()}


def load_parsenet(path: str | Path, device: torch.device | str = "cpu") -> ParseNet:
    """Build :class:`ParseNet` from its official file (plain state dict, strict as the reference)."""
    state_dict = read_checkpoint(path, name=CHECKPOINT_NAME)
    model, _ = build_checked(ParseNet, state_dict, checkpoint_filter_fn, name=CHECKPOINT_NAME, device=device)
    return channels_last(model)  # measured faster on CPU

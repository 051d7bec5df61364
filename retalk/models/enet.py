"""E-Net (VideoReTalking's enhancement network): L-Net at 96x96, then a two-stage StyleGAN2 up-sampler (x4)
modulated by a style code of the reference face. Images are BGR in [0, 1]; ``pred`` (B, 3, 384, 384) is not
clamped (the pipeline clamps).

The embedded L-Net comes only from L-Net's own file: the reference loader drops every ``low_res`` key of
E-Net's file, so :func:`load_enet` checks that file against E-Net's own layers and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retalk.checkpoints.catalogue import ENET as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.lnet import load_lnet
from retalk.models.stylegan2 import (
    ResBlock,
    StyleConv,
    ToRGB,
    default_noise_generator,
    rename_clean_styled_keys,
    resolve_noise,
    stylegan2_channels,
)

_log = logging.getLogger(__name__)

LNET_SIZE = 96
STYLE_SIZE = 256
PAD = 2  # reflect padding of the L-Net output; x4 up-sampling turns it into the 8 px cropped at the end


class ENet(nn.Module):
    """ENet(lnet, num_style_feat=512, concat=False) of the reference.

    ``forward(mel (B,1,80,16), img_batch (B,6,384,384), reference (B,3,384,384), noise=None, generator=None)``
    returns ``(pred (B,3,384,384), low_res (B,3,96,96))``. The style code comes from ``img_batch[:, 3:]``, the
    L-Net input from ``cat(img_batch[:, :3], reference)`` (the pipeline passes ``reference = img_batch[:, 3:]``).
    ``noise``: four per-layer maps (broadcast to (B,1,H,W); None entries drawn); drawn maps come from
    ``generator``, else from a generator with the fixed default seed, so every call renders the same.
    """

    def __init__(self, lnet: nn.Module, style_dim: int = 512):
        super().__init__()
        self.lnet = lnet
        channels = stylegan2_channels(channel_multiplier=2)
        # style encoder: 256 px reference -> 4x4 -> style code
        self.conv_body_first = nn.Conv2d(3, channels[128], 1)
        self.conv_body_down = nn.ModuleList()
        in_channels = channels[128]
        for res in (128, 64, 32, 16, 8, 4):  # output size of each block
            self.conv_body_down.append(ResBlock(in_channels, channels[res], mode="down"))
            in_channels = channels[res]
        self.final_conv = nn.Conv2d(channels[4], channels[4], 3, 1, 1)
        self.final_linear = nn.Linear(channels[4] * 4 * 4, style_dim)
        # up-sampler: two x2 stages from the 3-channel L-Net image
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = 3
        for res in (128, 256):
            self.style_convs.append(StyleConv(in_channels, channels[res], style_dim, upsample="bilinear"))
            self.style_convs.append(StyleConv(channels[res], channels[res], style_dim))
            self.to_rgbs.append(ToRGB(channels[res], style_dim, upsample_skip="bilinear"))
            in_channels = channels[res]

    def forward(
        self,
        mel: Tensor,
        img_batch: Tensor,
        reference: Tensor,
        noise: Sequence[Tensor | None] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        batch = img_batch.shape[0]
        masked, style_source = img_batch[:, :3], img_batch[:, 3:]
        noise = resolve_noise(noise, generator, [default_noise_generator()] * len(self.style_convs))

        # 1. style code of the reference face
        x = F.interpolate(style_source, size=(STYLE_SIZE, STYLE_SIZE), mode="bilinear", align_corners=False)
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)  # [B, 3, 256, 256] -> [B, 256, 256, 256]
        for block in self.conv_body_down:
            feat = block(feat)  # -> [B, 512, 4, 4] after six blocks
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        style = self.final_linear(feat.reshape(batch, -1))  # [B, 8192] -> [B, 512]

        # 2. L-Net on the 96 px version of (masked, reference)
        face = F.interpolate(
            torch.cat([masked, reference], 1),
            size=(LNET_SIZE, LNET_SIZE),
            mode="bilinear",
            align_corners=False,
        )
        low_res = self.lnet(mel, face)  # [B, 3, 96, 96]

        # 3. StyleGAN2 up-sampling of the padded L-Net image
        out = skip = F.pad(low_res, (PAD, PAD, PAD, PAD), mode="reflect")  # [B, 3, 100, 100]
        for level, to_rgb in enumerate(self.to_rgbs):
            out = self.style_convs[2 * level](out, style, noise[2 * level])  # [B, C, H, W] -> [B, C', 2H, 2W]
            out = self.style_convs[2 * level + 1](out, style, noise[2 * level + 1])
            skip = to_rgb(out, style, skip)  # RGB at 200, then 400 px
        crop = 4 * PAD
        return skip[:, :, crop:-crop, crop:-crop], low_res  # [B, 3, 384, 384], [B, 3, 96, 96]


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: ENet) -> dict[str, Tensor]:
    """E-Net's own official keys (the reference transform already applied) -> this module's."""
    return rename_clean_styled_keys(state_dict)


def load_enet(enet_path: str | Path, lnet_path: str | Path, device: str | torch.device = "cpu") -> ENet:
    """E-Net from its official file (``['state_dict']``, ``low_res`` keys dropped) with its L-Net from L-Net's."""
    raw = read_checkpoint(enet_path, name=CHECKPOINT_NAME, container_keys=("state_dict",))
    state_dict = {k.replace("module.", ""): v for k, v in raw.items() if "low_res" not in k}
    # E-Net's own layers are checked before the much larger L-Net file is read
    model, report = build_checked(
        lambda: ENet(lnet=nn.Identity()),
        state_dict,
        checkpoint_filter_fn,
        name=CHECKPOINT_NAME,
        allow_unexpected=True,
        device=device,
    )
    if not report.clean:
        # the reference loads with strict=False and ignores them too
        _log.warning("%s (ignored)", report.summary())
    model.lnet = load_lnet(lnet_path, device=device)
    return model

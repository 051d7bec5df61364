"""D-Net: VideoReTalking's expression stabiliser (PIRenderer design), 256×256 RGB face + 3DMM window -> face.

A mapping net turns a (73, 26) window of coefficients into a 256-d descriptor; a warping net (ADAIN
hourglass) predicts a flow at 64×64 and warps the source; an editing net refines (source, warped) into the
output. Images are RGB in [-1, 1].

The reference's ``FineADAINResBlock2d`` computes a first conv/ADAIN branch and discards it (its output is
overwritten); the effective block is ``x + ADAIN(conv2(x), z)``, so this module has no first branch and
:func:`checkpoint_filter_fn` drops its keys: exact, and a third of the editing decoder's convolutions saved.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from retalk.checkpoints.catalogue import DNET as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.pirender import (
    ADAIN,
    PIRENDER_SLOPE,
    PYRAMID_KEY_RULES,
    LayerNorm2d,
    PyramidEncoder,
    SkipDecoder,
    pyramid_channels,
    rename_keys,
)

_log = logging.getLogger(__name__)


class MappingNet(nn.Module):
    """Coefficient window (B, 73, T ≥ 25) -> descriptor (B, 256, 1): conv1d, three dilated residual conv1d, mean."""

    def __init__(self, coeff_dim: int = 73, descriptor_dim: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.first = nn.Conv1d(coeff_dim, descriptor_dim, kernel_size=7)
        self.blocks = nn.ModuleList(
            nn.Conv1d(descriptor_dim, descriptor_dim, kernel_size=3, dilation=3) for _ in range(layers)
        )

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        x = self.first(coeffs)  # [B, 73, 26] -> [B, 256, 20]
        for block in self.blocks:
            x = block(F.leaky_relu(x, PIRENDER_SLOPE)) + x[:, :, 3:-3]  # length -6: 20 -> 14 -> 8 -> 2
        return F.adaptive_avg_pool1d(x, 1)  # -> [B, 256, 1]


class ADAINEncoderBlock(nn.Module):
    """ADAIN -> act -> 4×4 stride-2 conv -> ADAIN -> act -> 3×3 conv."""

    def __init__(self, in_channels: int, out_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.norm_0 = ADAIN(in_channels, feature_dim)
        self.conv_0 = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm_1 = ADAIN(out_channels, feature_dim)
        self.conv_1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_0(F.leaky_relu(self.norm_0(x, z), PIRENDER_SLOPE))  # [B, C, H, W] -> [B, C', H/2, W/2]
        return self.conv_1(F.leaky_relu(self.norm_1(x, z), PIRENDER_SLOPE))


class ADAINDecoderBlock(nn.Module):
    """Residual ×2 up-block: ADAIN -> act -> 3×3 conv -> ADAIN -> act -> 3×3 stride-2 transposed conv, plus an
    ADAIN -> act -> transposed-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, feature_dim: int) -> None:
        super().__init__()
        up = {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}
        self.norm_0 = ADAIN(in_channels, feature_dim)
        self.conv_0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm_1 = ADAIN(out_channels, feature_dim)
        self.conv_1 = nn.ConvTranspose2d(out_channels, out_channels, **up)
        self.norm_s = ADAIN(in_channels, feature_dim)
        self.conv_s = nn.ConvTranspose2d(in_channels, out_channels, **up)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(F.leaky_relu(self.norm_s(x, z), PIRENDER_SLOPE))  # -> [B, C', 2H, 2W]
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, z), PIRENDER_SLOPE))
        return shortcut + self.conv_1(F.leaky_relu(self.norm_1(dx, z), PIRENDER_SLOPE))


class ADAINHourglass(nn.Module):
    """7×7 conv, 5 ADAIN down-blocks (256 -> 8 px), 3 ADAIN up-blocks with skip concatenation (8 -> 64 px)."""

    def __init__(
        self,
        image_channels: int = 3,
        feature_dim: int = 256,
        base_channels: int = 32,
        max_channels: int = 256,
        encoder_levels: int = 5,
        decoder_levels: int = 3,
    ) -> None:
        super().__init__()
        pyramid = pyramid_channels(base_channels, max_channels, encoder_levels)
        self.input_layer = nn.Conv2d(image_channels, base_channels, 7, padding=3)
        self.encoder = nn.ModuleList(ADAINEncoderBlock(cin, cout, feature_dim) for cin, cout in pyramid)
        # decoder level i (finest first, as in the official keys) mirrors encoder level i; every level but the
        # coarsest also receives the skip features concatenated to its input
        self.first_decoded_level = encoder_levels - decoder_levels
        self.decoder = nn.ModuleDict(
            {
                str(i): ADAINDecoderBlock(cout if i == encoder_levels - 1 else 2 * cout, cin, feature_dim)
                for i, (cin, cout) in enumerate(pyramid)
                if i >= self.first_decoded_level
            }
        )
        self.output_channels = 2 * pyramid[self.first_decoded_level][0]

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)  # [B, 3, 256, 256] -> [B, 32, 256, 256]
        skips = [x]
        for block in self.encoder:
            x = block(x, z)
            skips.append(x)  # 128, 64, 32, 16, 8 px
        x = skips.pop()
        for i in reversed(range(self.first_decoded_level, len(self.encoder))):
            x = torch.cat([self.decoder[str(i)](x, z), skips.pop()], dim=1)  # 8 -> 16 -> 32 -> 64 px
        return x  # [B, 256, 64, 64]


def identity_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(H, W, 2) sampling grid in [-1, 1] with the align-corners convention ``2·i/(n-1) - 1``; x first."""
    x = 2 * (torch.arange(width).to(like) / (width - 1)) - 1
    y = 2 * (torch.arange(height).to(like) / (height - 1)) - 1
    return torch.stack([x.view(1, -1).expand(height, width), y.view(-1, 1).expand(height, width)], dim=2)


def warp_with_flow(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp ``image`` by a pixel flow at any resolution, exactly as the reference's ``flow_util``.

    The deformation (identity grid + flow in grid units, align-corners convention) is bilinearly resized to the
    image size and used with ``grid_sample``'s defaults (bilinear, zero padding, ``align_corners=False``).
    """
    _, _, h, w = flow.shape
    flow_norm = 2 * torch.cat([flow[:, :1] / (w - 1), flow[:, 1:] / (h - 1)], dim=1)
    deformation = identity_grid(h, w, flow) + flow_norm.permute(0, 2, 3, 1)  # [B, h, w, 2]
    if (h, w) != tuple(image.shape[2:]):
        deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=image.shape[2:], mode="bilinear")
        deformation = deformation.permute(0, 2, 3, 1)  # [B, H, W, 2]
    return F.grid_sample(image, deformation, mode="bilinear", padding_mode="zeros", align_corners=False)


class WarpingNet(nn.Module):
    """Hourglass -> LayerNorm2d -> act -> 7×7 conv: flow (B, 2, 64, 64) in pixels; the source warped by it."""

    def __init__(self, feature_dim: int = 256) -> None:
        super().__init__()
        self.hourglass = ADAINHourglass(feature_dim=feature_dim)
        self.flow_norm = LayerNorm2d(self.hourglass.output_channels)
        self.flow_conv = nn.Conv2d(self.hourglass.output_channels, 2, 7, padding=3)

    def forward(self, image: torch.Tensor, descriptor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hourglass(image, descriptor)
        flow = self.flow_conv(F.leaky_relu(self.flow_norm(features), PIRENDER_SLOPE))  # -> [B, 2, 64, 64]
        return flow, warp_with_flow(image, flow)


class FineADAINResBlock(nn.Module):
    """``x + ADAIN(conv(x), z)``: the effective part of the reference's FineADAINResBlock2d."""

    def __init__(self, channels: int, feature_dim: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = ADAIN(channels, feature_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(x), z) + x


class EditingNet(nn.Module):
    """concat(source, warped) -> conv pyramid 256 -> 32 px -> skip decoder with ADAIN residual blocks -> tanh."""

    def __init__(
        self,
        image_channels: int = 3,
        feature_dim: int = 256,
        levels: int = 3,
        base_channels: int = 64,
        max_channels: int = 256,
        num_res_blocks: int = 2,
    ) -> None:
        super().__init__()
        self.encoder = PyramidEncoder(2 * image_channels, base_channels, max_channels, levels)
        self.decoder = SkipDecoder(
            [(cout, cin) for cin, cout in pyramid_channels(base_channels, max_channels, levels)],
            lambda channels: (FineADAINResBlock(channels, feature_dim) for _ in range(num_res_blocks)),
            image_channels,
            torch.tanh,
        )

    def forward(self, image: torch.Tensor, warped: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        features = self.encoder(torch.cat([image, warped], dim=1))  # 64@256, 128@128, 256@64, 256@32
        return self.decoder(features, descriptor)  # -> [B, 3, 256, 256]


class DNet(nn.Module):
    """``DNet()(image (B,3,256,256) RGB [-1,1], coeffs (B,73,26))`` -> dict of ``flow_field`` (B,2,64,64),
    ``warp_image`` and ``fake_image`` (B,3,256,256; tanh). Pass ``warp_only=True`` to skip the editing net."""

    def __init__(self) -> None:
        super().__init__()
        self.mapping_net = MappingNet()
        self.warping_net = WarpingNet()
        self.editing_net = EditingNet()

    def forward(
        self, input_image: torch.Tensor, driving_source: torch.Tensor, warp_only: bool = False
    ) -> dict[str, torch.Tensor]:
        descriptor = self.mapping_net(driving_source)  # [B, 73, 26] -> [B, 256, 1]
        flow, warped = self.warping_net(input_image, descriptor)
        out = {"flow_field": flow, "warp_image": warped}
        if not warp_only:
            out["fake_image"] = self.editing_net(input_image, warped, descriptor)
        return out


# official key -> DNet key (applied in order, before the shared pyramid/decoder rules)
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^warpping_net\.", "warping_net."),
    (r"^mapping_net\.first\.0\.", "mapping_net.first."),
    (r"^mapping_net\.encoder(\d+)\.1\.", r"mapping_net.blocks.\1."),
    (r"^warping_net\.hourglass\.encoder\.encoder(\d+)\.", r"warping_net.hourglass.encoder.\1."),
    (r"^warping_net\.hourglass\.encoder\.input_layer\.", "warping_net.hourglass.input_layer."),
    (r"^warping_net\.hourglass\.decoder\.decoder(\d+)\.", r"warping_net.hourglass.decoder.\1."),
    (r"^warping_net\.flow_out\.0\.", "warping_net.flow_norm."),
    (r"^warping_net\.flow_out\.2\.", "warping_net.flow_conv."),
    *PYRAMID_KEY_RULES,
)

# the discarded first branch of the editing decoder's residual blocks (see the module docstring)
_DEAD_BRANCH = r"^editing_net\.decoder\.res\d+\.res\d+\.(conv1|norm1)\."


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """The official file's ``['net_G_ema']`` keys -> :class:`DNet` keys; the dead-branch entries are dropped.
    ``model`` is unused (timm signature)."""
    live = {k: v for k, v in state_dict.items() if not re.match(_DEAD_BRANCH, k)}
    return rename_keys(live, _KEY_RULES)


def load_dnet(path: str | Path, device: str | torch.device = "cpu") -> DNet:
    """Build :class:`DNet` from its official file (``['net_G_ema']``); any missing key is an error."""
    raw = read_checkpoint(path, name=CHECKPOINT_NAME, container_keys=("net_G_ema",))
    model, report = build_checked(
        DNet, raw, checkpoint_filter_fn, name=CHECKPOINT_NAME, allow_unexpected=True, device=device
    )
    if not report.clean:
        # the reference loads with strict=False; extra entries are ignored there too, but say so
        _log.warning("%s (ignored)", report.summary())
    return model

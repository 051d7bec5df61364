"""Blocks shared by L-Net and D-Net (the PIRenderer family of VideoReTalking's ``models/base_blocks.py``).

Both networks normalise with a per-sample layer norm over C×H×W, condition on a descriptor vector with
ADAIN, encode images with a conv pyramid and decode it coarse to fine with skip connections. The official
checkpoints nest these blocks as ``<name>.model.0`` (conv) / ``<name>.model.1`` (norm); the renames live in
each network's ``checkpoint_filter_fn`` (:func:`rename_keys` applies them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# LeakyReLU slope of the PIRenderer blocks (LNet, DNet); LNet's FFC blocks use torch's default 0.01.
PIRENDER_SLOPE = 0.1


class LayerNorm2d(nn.Module):
    """Layer norm over (C, H, W) of each sample with a per-channel affine (stored as (C, 1, 1))."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the affine broadcast, not expanded to (C, H, W): a converter would fold the expanded copy into a
        # constant per layer (OpenVINO's D-Net held ~200 MB of them)
        return F.layer_norm(x, x.shape[1:], eps=self.eps) * self.weight + self.bias


class ADAIN(nn.Module):
    """Instance norm (no affine) modulated per channel by a descriptor: ``norm(x) * (1 + gamma) + beta``."""

    def __init__(self, num_channels: int, feature_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden_dim, num_channels)
        self.mlp_beta = nn.Linear(hidden_dim, num_channels)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(feature.flatten(1))  # [B, F(, 1, 1)] -> [B, 128]
        gamma = self.mlp_gamma(actv)[:, :, None, None]
        beta = self.mlp_beta(actv)[:, :, None, None]
        return F.instance_norm(x, eps=1e-5) * (1 + gamma) + beta


class ConvNormAct(nn.Module):
    """Conv (padding k//2) -> LayerNorm2d -> LeakyReLU(0.1), optionally after a nearest ×2 or before a 2×2 avg-pool.

    One class for the reference's FirstBlock2d (7×7), DownBlock2d (pool), UpBlock2d (upsample) and Jump (3×3).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        upsample: bool = False,
        pool: bool = False,
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.pool = pool
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = LayerNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")  # [B, C, H, W] -> [B, C, 2H, 2W]
        x = F.leaky_relu(self.norm(self.conv(x)), PIRENDER_SLOPE)
        if self.pool:
            x = F.avg_pool2d(x, 2)  # [B, C, H, W] -> [B, C, H/2, W/2]
        return x


def pyramid_channels(base: int, cap: int, levels: int) -> list[tuple[int, int]]:
    """(in, out) channels of each level of a pyramid that doubles ``base`` per level up to ``cap``."""
    return [(min(base * 2**i, cap), min(base * 2 ** (i + 1), cap)) for i in range(levels)]


class PyramidEncoder(nn.Module):
    """7×7 stem, then one conv-norm-act-avgpool level per entry of ``channels``; returns every level's features."""

    def __init__(self, in_channels: int, base_channels: int, max_channels: int, levels: int) -> None:
        super().__init__()
        self.first = ConvNormAct(in_channels, base_channels, 7)
        self.downs = nn.ModuleList(
            ConvNormAct(cin, cout, 3, pool=True)
            for cin, cout in pyramid_channels(base_channels, max_channels, levels)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.first(x)
        features = [x]
        for down in self.downs:
            x = down(x)  # [B, C, H, W] -> [B, C', H/2, W/2]
            features.append(x)
        return features


class SkipDecoder(nn.Module):
    """Coarse to fine: per level, descriptor-conditioned residual blocks, nearest ×2 + conv, plus a conv of the
    encoder feature of the same size; then a 7×7 conv to the image and ``sigmoid`` or ``tanh``.

    ``level_channels[i]`` = (in, out) of level i (index 0 is the finest, as in the official key names);
    ``make_res_blocks(in_channels)`` builds one level's residual blocks, each called as ``block(x, z)``.
    """

    def __init__(
        self,
        level_channels: Sequence[tuple[int, int]],
        make_res_blocks: Callable[[int], Iterable[nn.Module]],
        out_channels: int,
        final_activation: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(nn.ModuleList(make_res_blocks(cin)) for cin, _ in level_channels)
        self.ups = nn.ModuleList(ConvNormAct(cin, cout, 3, upsample=True) for cin, cout in level_channels)
        self.jumps = nn.ModuleList(ConvNormAct(cout, cout, 3) for _, cout in level_channels)
        self.final = nn.Conv2d(level_channels[0][1], out_channels, 7, padding=3)
        self.final_activation = final_activation

    def forward(self, features: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        x = features[-1]
        for level in reversed(range(len(self.ups))):
            for block in self.res_blocks[level]:
                x = block(x, z)
            x = self.ups[level](x)  # [B, C, H, W] -> [B, C', 2H, 2W]
            x = self.jumps[level](features[level]) + x
        return self.final_activation(self.final(x))


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Apply every ``(pattern, replacement)`` regex rule, in order, to every key."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


# Official ``<block>.model.0`` / ``.model.1`` of FirstBlock2d, DownBlock2d, UpBlock2d, Jump; ``.model.0`` of
# FinalBlock2d; numbered down/up/jump/res levels -> the ModuleLists above.
PYRAMID_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"\.final\.model\.0\.", ".final."),
    (r"\.model\.0\.", ".conv."),
    (r"\.model\.1\.", ".norm."),
    (r"\.down(\d+)\.", r".downs.\1."),
    (r"\.up(\d+)\.", r".ups.\1."),
    (r"\.jump(\d+)\.", r".jumps.\1."),
    (r"\.res(\d+)\.res(\d+)\.", r".res_blocks.\1.\2."),
)

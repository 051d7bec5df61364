"""GFPGAN v1.3 ("clean" architecture): a U-Net encoder that predicts 16 latents and per-resolution SFT
conditions for a StyleGAN2 decoder (Wang et al., CVPR 2021). Input and output are RGB in [-1, 1] at 512x512;
the output is not clamped.

Only what inference uses is built: the U-Net's intermediate RGB heads (``toRGB.*``) and the decoder's style MLP
(``stylegan_decoder.style_mlp.*``, bypassed because the latents come from the encoder) are in the official file
but dropped by ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retalk.checkpoints.catalogue import GFPGAN as CHECKPOINT_NAME
from retalk.device import channels_last
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.stylegan2 import (
    ResBlock,
    StyleGAN2Decoder,
    rename_clean_styled_keys,
    resolve_noise,
    stylegan2_channels,
)


def _sft_branch(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, 1, 1)
    )


class GFPGANv1Clean(nn.Module):
    """GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, different_w, sft_half, input_is_latent).

    ``forward(x, noise=None, generator=None)``: the decoder's 15 noise maps are the file's stored buffers
    (the reference's ``randomize_noise=False``) unless ``noise`` entries or a ``generator`` are given.
    """

    def __init__(
        self, out_size: int = 512, style_dim: int = 512, channel_multiplier: int = 2, narrow: float = 1.0
    ):
        super().__init__()
        self.style_dim = style_dim
        self.log_size = int(math.log2(out_size))
        # the U-Net has half the decoder's channels
        unet = stylegan2_channels(channel_multiplier, narrow=narrow / 2)
        self.conv_body_first = nn.Conv2d(3, unet[out_size], 1)
        self.conv_body_down = nn.ModuleList(
            ResBlock(unet[2**i], unet[2 ** (i - 1)], mode="down") for i in range(self.log_size, 2, -1)
        )
        self.final_conv = nn.Conv2d(unet[4], unet[4], 3, 1, 1)
        num_latents = 2 * self.log_size - 2
        self.final_linear = nn.Linear(unet[4] * 4 * 4, num_latents * style_dim)
        self.conv_body_up = nn.ModuleList(
            ResBlock(unet[2 ** (i - 1)], unet[2**i], mode="up") for i in range(3, self.log_size + 1)
        )
        self.condition_scale = nn.ModuleList(_sft_branch(unet[2**i]) for i in range(3, self.log_size + 1))
        self.condition_shift = nn.ModuleList(_sft_branch(unet[2**i]) for i in range(3, self.log_size + 1))
        self.decoder = StyleGAN2Decoder(
            out_size, style_dim, channel_multiplier, narrow=narrow, resample="bilinear"
        )
        self.noises = nn.Module()
        for i in range(self.decoder.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.zeros(1, 1, res, res))

    def forward(
        self,
        x: Tensor,
        noise: Sequence[Tensor | None] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        # 1. U-Net encoder
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)  # [B, 3, 512, 512] -> [B, 32, 512, 512]
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)  # [B, 256, 4, 4]

        # 2. one latent per decoder layer
        latent = self.final_linear(feat.reshape(feat.shape[0], -1)).view(feat.shape[0], -1, self.style_dim)

        # 3. U-Net decoder -> SFT (scale, shift) per resolution 8..512
        conditions = []
        for block, to_scale, to_shift, skip in zip(
            self.conv_body_up, self.condition_scale, self.condition_shift, reversed(skips), strict=True
        ):
            feat = block(feat + skip)  # [B, C, H, W] -> [B, C', 2H, 2W]
            conditions.append((to_scale(feat), to_shift(feat)))

        # 4. StyleGAN2 decoder with SFT
        stored = [getattr(self.noises, f"noise{i}") for i in range(self.decoder.num_layers)]
        return self.decoder(latent, resolve_noise(noise, generator, stored), conditions)  # [B, 3, 512, 512]


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: GFPGANv1Clean) -> dict[str, Tensor]:
    """Official GFPGANv1.3 keys -> this module's: drop the unused heads, rename the decoder's styled layers."""
    kept = {
        k: v for k, v in state_dict.items() if not k.startswith(("toRGB.", "stylegan_decoder.style_mlp."))
    }
    out = {}
    for key, value in rename_clean_styled_keys(kept).items():
        if key.startswith("stylegan_decoder.noises."):
            key = key.removeprefix("stylegan_decoder.")
        out[key.replace("stylegan_decoder.", "decoder.", 1)] = value
    return out


def load_gfpgan(path: str | Path, device: str | torch.device = "cpu") -> GFPGANv1Clean:
    """The official file (``params_ema``, else ``params``) -> GFPGANv1Clean in eval mode on ``device``."""
    sd = read_checkpoint(path, name=CHECKPOINT_NAME, container_keys=("params_ema", "params"))
    model, _ = build_checked(GFPGANv1Clean, sd, checkpoint_filter_fn, name=CHECKPOINT_NAME, device=device)
    return channels_last(model)  # measured faster on CPU

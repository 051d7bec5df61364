"""GPEN-BFR-512 (Yang et al., CVPR 2021): a conv encoder whose final feature gives the style and whose
per-resolution features are fed to a StyleGAN2 decoder as its "noise", concatenated as extra channels.
Input and output are RGB in [-1, 1] at 512x512; the output is not clamped. Deterministic: no random noise.

The official file stores equalised-lr weights (scaled by ``lr_mul / sqrt(fan_in)`` at run time in the
reference); ``checkpoint_filter_fn`` applies those scales once, so the layers here are plain convs and linears.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retalk.checkpoints.catalogue import GPEN as CHECKPOINT_NAME
from retalk.device import channels_last
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.pirender import rename_keys
from retalk.models.stylegan2 import FIR_TAPS, Blur, StyleGAN2Decoder, fused_leaky_relu, stylegan2_channels

MAPPING_LR_MUL = 0.01  # lr_mlp of the reference Generator


class EncoderLayer(nn.Module):
    """Conv (optionally FIR blur + stride 2) without bias, then fused bias + LeakyReLU(0.2) x sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool):
        super().__init__()
        if downsample:
            p = len(FIR_TAPS) - 2 + (kernel_size - 1)  # blur support minus the factor, plus the conv's
            self.blur = Blur(pad=((p + 1) // 2, p // 2))
        self.downsample = downsample
        stride, padding = (2, 0) if downsample else (1, kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            x = self.blur(x)
        return fused_leaky_relu(self.conv(x), self.bias)


class PixelNorm(nn.Module):
    """Scale each vector to unit root-mean-square."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class LinearLeakyReLU(nn.Module):
    """Linear map, then fused bias + LeakyReLU(0.2) x sqrt(2) (the reference EqualLinear with activation)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(F.linear(x, self.weight), self.bias)


class GPEN(nn.Module):
    """FullGenerator(512, 512, n_mlp=8, channel_multiplier=2, narrow=1, isconcat=True)."""

    def __init__(
        self,
        size: int = 512,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        narrow: float = 1.0,
    ):
        super().__init__()
        channels = stylegan2_channels(channel_multiplier, narrow)
        log_size = int(math.log2(size))
        self.encoder = nn.ModuleList([EncoderLayer(3, channels[size], 1, downsample=False)])
        self.encoder.extend(
            EncoderLayer(channels[2**i], channels[2 ** (i - 1)], 3, downsample=True)
            for i in range(log_size, 2, -1)
        )
        self.to_style = LinearLeakyReLU(channels[4] * 4 * 4, style_dim)
        self.mapping = nn.Sequential(
            PixelNorm(), *(LinearLeakyReLU(style_dim, style_dim) for _ in range(n_mlp))
        )
        self.decoder = StyleGAN2Decoder(
            size, style_dim, channel_multiplier, narrow=narrow, resample="fir", concat_noise=True
        )

    def forward(self, x: Tensor) -> Tensor:
        # 1. encoder: features at 512, 256, ..., 4 px
        feats = []
        for layer in self.encoder:
            x = layer(x)  # [B, C, H, W] -> [B, C', H/2, W/2] (first layer keeps 512)
            feats.append(x)
        # 2. style: linear on the 4x4 feature, then pixel norm + mapping MLP; the same latent for every layer
        w = self.to_style(x.reshape(x.shape[0], -1))  # [B, 512*4*4] -> [B, 512]
        w = self.mapping(w)
        latent = w.unsqueeze(1).expand(-1, self.decoder.num_layers + 1, -1)
        # 3. decoder; its "noise" is the encoder feature of each resolution (4 px once, then twice per size)
        feats.reverse()
        noise = [feats[0]] + [f for f in feats[1:] for _ in range(2)]
        return self.decoder(latent, noise)  # [B, 3, 512, 512]


_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^ecd(\d+)\.0\.0\.kernel$", r"encoder.\1.blur.kernel"),
    (r"^ecd(\d+)\.0\.\d+\.weight$", r"encoder.\1.conv.weight"),
    (r"^ecd(\d+)\.0\.\d+\.bias$", r"encoder.\1.bias"),
    (r"^final_linear\.0\.", "to_style."),
    (r"^generator\.style\.", "mapping."),
    (r"^generator\.input\.input$", "decoder.constant_input.weight"),
    (r"^generator\.conv1\.", "decoder.style_conv1."),
    (r"^generator\.convs\.", "decoder.style_convs."),
    (r"^generator\.(to_rgb1|to_rgbs)\.", r"decoder.\1."),
    (r"\.noise\.weight$", ".noise_strength"),
    (r"\.activate\.bias$", ".bias"),
)


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: GPEN) -> dict[str, Tensor]:
    """Official GPEN keys -> this module's, with the reference's run-time weight scales applied once."""
    out = {}
    for key, value in rename_keys(state_dict, _KEY_RULES).items():
        if key.startswith("mapping.") and key.endswith("weight"):
            value = value * ((1 / math.sqrt(value.shape[1])) * MAPPING_LR_MUL)
        elif key.startswith("mapping."):
            value = value * MAPPING_LR_MUL
        elif key.endswith((".conv.weight", ".modulation.weight", "to_style.weight")):
            fan_in = math.prod(
                value.shape[-3:] if value.ndim == 5 else value.shape[1:]
            )  # modulated: [1, O, I, k, k]
            value = value * (1 / math.sqrt(fan_in))
        elif re.fullmatch(r"decoder\.(to_rgb1|to_rgbs\.\d+)\.bias", key):
            value = value.reshape(-1)
        out[key] = value
    return out


def load_gpen(path: str | Path, device: str | torch.device = "cpu") -> GPEN:
    """The official file (a plain state dict) -> GPEN in eval mode on ``device``."""
    sd = read_checkpoint(path, name=CHECKPOINT_NAME)
    model, _ = build_checked(GPEN, sd, checkpoint_filter_fn, name=CHECKPOINT_NAME, device=device)
    return channels_last(model)  # measured faster on CPU

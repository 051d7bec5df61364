"""StyleGAN2 parts shared by E-Net, GFPGAN v1.3 (clean) and GPEN-BFR-512, written once.

Two variants of the same layers exist in the reference, and both are built from the classes below:

* ``resample="bilinear"`` (GFPGAN's "clean" StyleGAN2, which E-Net reuses): bilinear x2 before the modulated
  conv, bilinear x2 of the RGB skip, noise *added* to the features, then bias and LeakyReLU(0.2).
* ``resample="fir"`` (rosinality's StyleGAN2 as GPEN uses it): stride-2 transposed conv followed by a [1,3,3,1]
  FIR blur, FIR-upsampled RGB skip, noise *concatenated* as extra channels (``concat_noise``), then the fused
  bias + LeakyReLU(0.2) x sqrt(2). Its equalised-lr runtime scales (``weight * lr_mul / sqrt(fan_in)``) are
  folded into the stored weights by each model's ``checkpoint_filter_fn``; multiplying once at load is the same
  float32 product the reference forms on every call.

Noise for the additive variant is per layer either an explicit tensor (broadcast to ``(B, 1, H, W)``) or a
``torch.Generator`` from which a ``(1, 1, H, W)`` map is drawn on the generator's device: every frame of a batch
gets the same map, so a frame renders identically whatever the batching, and never from the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retalk.errors import InputError

SQRT2 = math.sqrt(2.0)
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)
DEFAULT_NOISE_SEED = 0

Resample = Literal["bilinear", "fir"]
Noise = Tensor | torch.Generator


def stylegan2_channels(channel_multiplier: int = 2, narrow: float = 1.0) -> dict[int, int]:
    """Feature channels per resolution, as every StyleGAN2-derived network here defines them."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}  # fmt: skip
    return {size: int(c * narrow) for size, c in base.items()}


def make_fir_kernel(taps: Sequence[float] = FIR_TAPS, gain: float = 1.0) -> Tensor:
    """Separable 2-D FIR kernel: outer product of ``taps``, normalised to sum 1, times ``gain``."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Zero-stuff by ``up``, pad (negative = crop) both axes by ``pad``, FIR-filter per channel, keep every ``down``-th.

    Filtering is a true convolution (the kernel is flipped), as in StyleGAN2's upfirdn2d.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(b, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)  # [B, C, H, W] -> [B, C, H*up, W*up]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip(0, 1).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def fused_leaky_relu(x: Tensor, bias: Tensor, negative_slope: float = 0.2, scale: float = SQRT2) -> Tensor:
    """``scale * leaky_relu(x + bias)`` with a per-channel bias (StyleGAN2's fused_bias_act, in plain PyTorch)."""
    out = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu_(out, negative_slope).mul_(
        scale
    )  # in place on the fresh sum: same math, less traffic


class Blur(nn.Module):
    """[1,3,3,1] FIR filter with a stored kernel (zero-stuffing by ``up`` first): StyleGAN2's Blur and Upsample."""

    def __init__(self, pad: tuple[int, int], up: int = 1, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_fir_kernel(FIR_TAPS, gain))
        self.pad = pad
        self.up = up

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.up, pad=self.pad)


def fir_upsample() -> Blur:
    """x2 FIR up-sampler whose output is exactly twice the input size."""
    p = len(FIR_TAPS) - 2
    return Blur(pad=((p + 1) // 2 + 1, p // 2), up=2, gain=4.0)


class ModulatedConv2d(nn.Module):
    """Style-modulated conv: per-sample weights ``w * s`` (s = Linear(style)), optionally demodulated.

    ``upsample``: None, ``"bilinear"`` (resize x2, then conv) or ``"fir"`` (stride-2 transposed conv, then blur).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: Resample | None = None,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.modulation = nn.Linear(style_dim, in_channels)
        self.weight = nn.Parameter(torch.empty(1, out_channels, in_channels, kernel_size, kernel_size))
        if upsample == "fir":
            p = len(FIR_TAPS) - 2 - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        b, c, h, w = x.shape
        k, o = self.kernel_size, self.out_channels
        style = self.modulation(style).view(b, 1, c, 1, 1)
        weight = self.weight * style  # [1, O, I, k, k] -> [B, O, I, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4], keepdim=True) + 1e-8)
        if self.upsample == "fir":
            # one group per sample; transposed conv wants [B*I, O, k, k]
            weight = weight.transpose(1, 2).reshape(b * c, o, k, k)
            out = F.conv_transpose2d(x.reshape(1, b * c, h, w), weight, stride=2, groups=b)
            return self.blur(out.view(b, o, *out.shape[2:]))  # [B, O, 2H+1, 2W+1] -> [B, O, 2H, 2W]
        if self.upsample == "bilinear":
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * o, c, k, k), padding=k // 2, groups=b)
        return out.view(b, o, h, w)


def _draw_noise(generator: torch.Generator, height: int, width: int) -> Tensor:
    return torch.randn((1, 1, height, width), generator=generator, device=generator.device)


class StyleConv(nn.Module):
    """Modulated 3x3 conv, noise injection, bias and LeakyReLU(0.2).

    Additive noise (clean): ``lrelu(conv * sqrt2 + strength * noise + bias)``; ``noise`` is a tensor broadcastable
    to ``(B, 1, H, W)`` or a generator. Concatenated noise (GPEN): ``sqrt2 * lrelu(cat(conv, strength * noise) +
    bias)``, the noise being a feature map with as many channels as the conv output, so the block outputs
    ``2 * out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        style_dim: int,
        upsample: Resample | None = None,
        concat_noise: bool = False,
    ):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, upsample=upsample)
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.concat_noise = concat_noise
        self.bias = nn.Parameter(torch.zeros(out_channels * (2 if concat_noise else 1)))

    def forward(self, x: Tensor, style: Tensor, noise: Noise) -> Tensor:
        out = self.conv(x, style)
        if isinstance(noise, torch.Generator):
            noise = _draw_noise(noise, *out.shape[2:])
        noise = noise.to(out.device, out.dtype)
        if self.concat_noise:
            return fused_leaky_relu(torch.cat([out, self.noise_strength * noise], 1), self.bias)
        out = out.mul_(SQRT2).add_(self.noise_strength * noise).add_(self.bias.view(1, -1, 1, 1))
        return F.leaky_relu_(out, 0.2)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation) + bias, added to the up-sampled RGB skip when one is given."""

    def __init__(self, in_channels: int, style_dim: int, upsample_skip: Resample | None):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))
        self.upsample_skip = upsample_skip
        if upsample_skip == "fir":
            self.upsample = fir_upsample()

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias.view(1, 3, 1, 1)
        if skip is None:
            return out
        if self.upsample_skip == "fir":
            skip = self.upsample(skip)
        elif self.upsample_skip == "bilinear":
            skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out + skip


class ConstantInput(nn.Module):
    """The learned 4x4 input of the StyleGAN2 synthesis network, repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class ResBlock(nn.Module):
    """GFPGAN's U-Net block (also E-Net's style encoder): conv, bilinear x2 / x0.5, conv, plus a resized 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int, mode: Literal["down", "up"]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.interpolate(out, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), 0.2)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return out + self.skip(x)


class StyleGAN2Decoder(nn.Module):
    """StyleGAN2 synthesis network from the constant 4x4 input to ``out_size`` (one latent per layer).

    ``forward(latent (B, L, D), noise)`` takes one noise entry per StyleConv (``2 * log2(out_size) - 3``); the
    optional ``conditions`` (GFPGAN's SFT) are (scale, shift) pairs per resolution from 8 px up, applied to the
    second half of the channels after the first conv of each resolution (GFPGAN v1.3's ``sft_half``).
    """

    def __init__(
        self,
        out_size: int = 512,
        style_dim: int = 512,
        channel_multiplier: int = 2,
        *,
        narrow: float = 1.0,
        resample: Resample = "bilinear",
        concat_noise: bool = False,
    ):
        super().__init__()
        channels = stylegan2_channels(channel_multiplier, narrow)
        mult = 2 if concat_noise else 1
        log_size = int(math.log2(out_size))
        self.num_layers = 2 * log_size - 3
        self.constant_input = ConstantInput(channels[4])
        self.style_conv1 = StyleConv(channels[4], channels[4], style_dim, concat_noise=concat_noise)
        self.to_rgb1 = ToRGB(channels[4] * mult, style_dim, upsample_skip=None)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = channels[4]
        for res in (2**i for i in range(3, log_size + 1)):
            out_channels = channels[res]
            self.style_convs.append(
                StyleConv(
                    in_channels * mult, out_channels, style_dim, upsample=resample, concat_noise=concat_noise
                )
            )
            self.style_convs.append(
                StyleConv(out_channels * mult, out_channels, style_dim, concat_noise=concat_noise)
            )
            self.to_rgbs.append(ToRGB(out_channels * mult, style_dim, upsample_skip=resample))
            in_channels = out_channels

    def forward(
        self,
        latent: Tensor,
        noise: Sequence[Noise],
        conditions: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        out = self.constant_input(latent.shape[0])  # [B, C4, 4, 4]
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for level, (conv1, conv2, to_rgb) in enumerate(
            zip(self.style_convs[::2], self.style_convs[1::2], self.to_rgbs, strict=True)
        ):
            i = 2 * level + 1
            out = conv1(out, latent[:, i], noise[i])  # [B, C, H, W] -> [B, C', 2H, 2W]
            if conditions is not None:
                scale, shift = conditions[level]
                same, sft = out.split(out.shape[1] // 2, dim=1)
                out = torch.cat([same, sft * scale + shift], dim=1)
            out = conv2(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)  # RGB at 2H x 2W
        return skip


def resolve_noise(
    noise: Sequence[Tensor | None] | None, generator: torch.Generator | None, defaults: Sequence[Noise]
) -> list[Noise]:
    """Per-layer noise: the explicit tensor where given, else ``generator`` when given, else the layer's default."""
    if noise is None:
        noise = [None] * len(defaults)
    elif len(noise) != len(defaults):
        raise InputError(
            f"noise: expected {len(defaults)} per-layer entries (tensor or None), got {len(noise)}"
        )
    fallback = [generator] * len(defaults) if generator is not None else defaults
    return [n if n is not None else f for n, f in zip(noise, fallback, strict=True)]


def default_noise_generator() -> torch.Generator:
    """A fresh CPU generator with the fixed default seed: the same noise on every call and on every device."""
    return torch.Generator().manual_seed(DEFAULT_NOISE_SEED)


def rename_clean_styled_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """GFPGAN-clean StyleConv/ToRGB names (also E-Net's) -> this module's; other keys pass through.

    ``X.modulated_conv.*`` -> ``X.conv.*``; a StyleConv's noise ``X.weight`` -> ``X.noise_strength``;
    ``X.bias`` (1, C, 1, 1) -> (C,).
    """
    out = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if f"{head}.modulated_conv.weight" in state_dict:  # key belongs to a StyleConv or ToRGB
            if leaf == "weight":
                key = f"{head}.noise_strength"
            elif leaf == "bias":
                value = value.reshape(-1)
        out[key.replace(".modulated_conv.", ".conv.")] = value
    return out

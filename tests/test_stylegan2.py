"""The shared StyleGAN2 parts against independent formulations."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retalk.errors import InputError
from retalk.models.stylegan2 import (
    ModulatedConv2d,
    StyleConv,
    fir_upsample,
    make_fir_kernel,
    resolve_noise,
    upfirdn2d,
)

# --- upfirdn2d ---


def _upfirdn2d_direct(
    x: np.ndarray, kernel: np.ndarray, up: int, down: int, pad: tuple[int, int]
) -> np.ndarray:
    """Textbook definition: zero-stuff, pad or crop, true convolution (loops), decimate."""
    b, c, h, w = x.shape
    z = np.zeros((b, c, h * up, w * up))
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, ((0, 0), (0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    z = z[:, :, max(-p0, 0) : z.shape[2] - max(-p1, 0), max(-p0, 0) : z.shape[3] - max(-p1, 0)]
    kh, kw = kernel.shape
    flipped = kernel[::-1, ::-1]
    out = np.zeros((b, c, z.shape[2] - kh + 1, z.shape[3] - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = (z[:, :, i : i + kh, j : j + kw] * flipped).sum((2, 3))
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize(
    ("up", "down", "pad"), [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (-1, 2)), (2, 2, (0, 0))]
)
def test_upfirdn2d_matches_textbook_definition(up: int, down: int, pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 4)).astype(np.float32)  # asymmetric: a missing flip would show
    got = upfirdn2d(torch.from_numpy(x), torch.from_numpy(kernel), up=up, down=down, pad=pad).numpy()
    np.testing.assert_allclose(got, _upfirdn2d_direct(x, kernel, up, down, pad), rtol=0, atol=1e-5)


def test_fir_upsample_doubles_size_and_keeps_a_constant_image_constant() -> None:
    x = torch.full((1, 2, 6, 5), 3.0)
    out = fir_upsample()(x)
    assert out.shape == (1, 2, 12, 10)
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], torch.full_like(out[:, :, 2:-2, 2:-2], 3.0))
    assert torch.equal(make_fir_kernel(gain=4.0).sum(), torch.tensor(4.0))


# --- modulated convolution ---


def _modulate_activations(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The other StyleGAN2 formulation: scale the input channels, shared-weight conv, scale the outputs."""
    s = conv.modulation(style)  # [B, I]
    weight = conv.weight[0]  # [O, I, k, k]
    demod = torch.rsqrt((weight[None] * s[:, None, :, None, None]).pow(2).sum([2, 3, 4]) + 1e-8)  # [B, O]
    x = x * s[:, :, None, None]
    if conv.upsample == "bilinear":
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if conv.upsample == "fir":
        # transposed stride-2 conv == zero-stuffing, padding by k-1 and a conv with the flipped kernel
        k = conv.kernel_size
        zero_stuffed = upfirdn2d(x, torch.ones(1, 1), up=2, pad=(k - 1, k - 2))
        out = F.conv2d(zero_stuffed, weight.flip(2, 3))
        out = conv.blur(out)
    else:
        out = F.conv2d(x, weight, padding=conv.kernel_size // 2)
    return out * demod[:, :, None, None]


@pytest.mark.parametrize("upsample", [None, "bilinear", "fir"])
def test_modulated_conv_equals_activation_modulation(
    upsample: str | None, randomize_weights: Callable[[torch.nn.Module, int], torch.nn.Module]
) -> None:
    conv = randomize_weights(ModulatedConv2d(5, 4, 3, style_dim=6, upsample=upsample), seed=1)
    x = torch.randn(3, 5, 8, 7, generator=torch.Generator().manual_seed(2))
    style = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, expected = conv(x, style), _modulate_activations(conv, x, style)
    assert got.shape == expected.shape == ((3, 4, 16, 14) if upsample else (3, 4, 8, 7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- noise ---


def test_generator_noise_is_the_same_for_every_frame_of_a_batch(
    randomize_weights: Callable[[torch.nn.Module, int], torch.nn.Module],
) -> None:
    layer = randomize_weights(StyleConv(4, 6, style_dim=5), seed=4)
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(5))
    style = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        batched = layer(x, style, torch.Generator().manual_seed(7))
        alone = layer(x[2:], style[2:], torch.Generator().manual_seed(7))
        other_seed = layer(x[2:], style[2:], torch.Generator().manual_seed(8))
    torch.testing.assert_close(batched[2:], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(alone, other_seed, atol=1e-3)


def test_concatenated_noise_doubles_the_channels(
    randomize_weights: Callable[[torch.nn.Module, int], torch.nn.Module],
) -> None:
    layer = randomize_weights(StyleConv(4, 6, style_dim=5, upsample="fir", concat_noise=True), seed=9)
    x, style = torch.randn(2, 4, 5, 5), torch.randn(2, 5)
    features = torch.randn(2, 6, 10, 10)
    with torch.inference_mode():
        out = layer(x, style, features)
    assert out.shape == (2, 12, 10, 10)
    # the second half is sqrt2 * lrelu(strength * features + bias): the features pass through unmixed
    expected = math.sqrt(2) * F.leaky_relu(
        layer.noise_strength * features + layer.bias[6:].view(1, -1, 1, 1), 0.2
    )
    torch.testing.assert_close(out[:, 6:], expected)


def test_resolve_noise_prefers_explicit_then_generator_then_default() -> None:
    explicit, default, generator = torch.zeros(1), torch.ones(1), torch.Generator()
    assert resolve_noise([explicit, None], None, [default, default]) == [explicit, default]
    resolved = resolve_noise([None, explicit], generator, [default, default])
    assert resolved[0] is generator and resolved[1] is explicit
    with pytest.raises(InputError, match="expected 2 per-layer entries"):
        resolve_noise([explicit], None, [default, default])

"""L-Net: the 96×96 lip-sync generator of VideoReTalking (mel chunk + masked/reference face -> face).

Audio encoder (Wav2Lip), two conv pyramids (masked face, reference face) joined by cross-attention at
12×12, and a skip decoder whose residual blocks are LaMa fast Fourier convolutions conditioned on the audio
feature with ADAIN. Images are BGR in [0, 1] (the reference never converts to RGB).

The official file stores spectral-normalised convs as ``weight_orig``/``weight_u``/``weight_v``; in eval
mode the reference divides by ``sigma = u·(W v)`` with the stored vectors on every call, so
:func:`checkpoint_filter_fn` folds that division into a plain weight once (same float32 ops, same result).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from retalk.checkpoints.catalogue import LNET as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.pirender import (
    ADAIN,
    PYRAMID_KEY_RULES,
    PyramidEncoder,
    SkipDecoder,
    pyramid_channels,
    rename_keys,
)

_log = logging.getLogger(__name__)


class AudioConv(nn.Module):
    """Wav2Lip audio block: conv -> BatchNorm (running stats) [-> + input] -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int | tuple[int, int] = 1,
        padding: int = 1,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.bn = nn.BatchNorm2d(out_channels)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        if self.residual:
            out = out + x
        return F.relu(out)


def audio_encoder() -> nn.Sequential:
    """Mel chunk (B, 1, 80, 16) -> audio feature (B, 512, 1, 1)."""
    return nn.Sequential(
        AudioConv(1, 32),
        AudioConv(32, 32, residual=True),
        AudioConv(32, 32, residual=True),
        AudioConv(32, 64, stride=(3, 1)),  # 80×16 -> 27×16
        AudioConv(64, 64, residual=True),
        AudioConv(64, 64, residual=True),
        AudioConv(64, 128, stride=3),  # -> 9×6
        AudioConv(128, 128, residual=True),
        AudioConv(128, 128, residual=True),
        AudioConv(128, 256, stride=(3, 2)),  # -> 3×3
        AudioConv(256, 256, residual=True),
        AudioConv(256, 512, padding=0),  # -> 1×1
        AudioConv(512, 512, kernel_size=1, padding=0),
    )


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention then pre-norm feed-forward, both residual.

    Queries and keys come from the masked stream ``x``, values from the reference stream ``y``.
    """

    def __init__(self, dim: int = 512, heads: int = 4, head_dim: int = 64, mlp_dim: int = 256) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_x = nn.LayerNorm(dim)
        self.norm_y = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, mlp_dim)
        self.ff_out = nn.Linear(mlp_dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # [B, N, h*d] -> [B, h, N, d]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xn, yn = self.norm_x(x), self.norm_y(y)
        q, k, v = self._heads(self.to_q(xn)), self._heads(self.to_k(xn)), self._heads(self.to_v(yn))
        attn = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: [B, h, N, d]
        x = self.to_out(attn.transpose(1, 2).flatten(2)) + x
        # the reference's GELU is the tanh approximation
        return self.ff_out(F.gelu(self.ff_in(self.norm_ff(x)), approximate="tanh")) + x


class CrossAttention(nn.Module):
    """Transformer(dim 512, depth 2, heads 4, dim_head 64, mlp 256) over the 12×12 tokens of both streams."""

    def __init__(self, dim: int = 512, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        y = y.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, y)
        return x.transpose(1, 2).reshape(b, c, h, w)


class VisualEncoder(nn.Module):
    """Two conv pyramids (masked face, reference); cross-attention between their last levels.

    Returns the masked stream's levels with the last one replaced by concat(attended masked, reference).
    """

    def __init__(
        self, image_channels: int = 3, base_channels: int = 64, max_channels: int = 512, levels: int = 3
    ):
        super().__init__()
        self.inp = PyramidEncoder(image_channels, base_channels, max_channels, levels)
        self.ref = PyramidEncoder(image_channels, base_channels, max_channels, levels)
        self.cross_attn = CrossAttention(min(base_channels * 2**levels, max_channels))

    def forward(self, masked: torch.Tensor, reference: torch.Tensor) -> list[torch.Tensor]:
        features = self.inp(masked)  # [B,64,96,96], [B,128,48,48], [B,256,24,24], [B,512,12,12]
        ref_last = self.ref(reference)[-1]
        attended = self.cross_attn(features[-1], ref_last)
        features[-1] = torch.cat([attended, ref_last], dim=1)  # -> [B, 1024, 12, 12]
        return features


class FourierUnit(nn.Module):
    """rfft2 (ortho) -> 1×1 conv + BN + ReLU on interleaved (re, im) channels -> irfft2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        spec = torch.view_as_real(torch.fft.rfftn(x, dim=(-2, -1), norm="ortho"))  # [B, C, H, W/2+1, 2]
        spec = spec.permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, -1)  # channels c0.re, c0.im, c1.re, ...
        spec = F.relu(self.bn(self.conv_layer(spec)))
        spec = spec.view(b, c, 2, h, -1).permute(0, 1, 3, 4, 2).contiguous()  # [B, C, H, W/2+1, 2]
        return torch.fft.irfftn(torch.view_as_complex(spec), s=(h, w), dim=(-2, -1), norm="ortho")


class SpectralTransform(nn.Module):
    """FFC global-to-global path (stride 1, no local Fourier unit): 1×1 halve, Fourier unit + skip, 1×1 back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1, bias=False), nn.BatchNorm2d(channels // 2)
        )
        self.fu = FourierUnit(channels // 2)
        self.conv2 = nn.Conv2d(channels // 2, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # [B, C, H, W] -> [B, C/2, H, W]
        return self.conv2(x + self.fu(x))


class FFCADAIN(nn.Module):
    """Fast Fourier convolution (ratio 0.75 global) then ADAIN and LeakyReLU(0.01) on each part."""

    def __init__(self, channels: int, feature_dim: int, global_ratio: float = 0.75) -> None:
        super().__init__()
        self.global_channels = int(channels * global_ratio)
        local_channels = channels - self.global_channels
        conv = {"kernel_size": 3, "padding": 1, "bias": False, "padding_mode": "reflect"}
        self.convl2l = nn.Conv2d(local_channels, local_channels, **conv)
        self.convl2g = nn.Conv2d(local_channels, self.global_channels, **conv)
        self.convg2l = nn.Conv2d(self.global_channels, local_channels, **conv)
        self.convg2g = SpectralTransform(self.global_channels)
        self.norm_l = ADAIN(local_channels, feature_dim)
        self.norm_g = ADAIN(self.global_channels, feature_dim)

    def forward(
        self, x_l: torch.Tensor, x_g: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_l = self.convl2l(x_l) + self.convg2l(x_g)
        out_g = self.convl2g(x_l) + self.convg2g(x_g)
        return F.leaky_relu(self.norm_l(out_l, z), 0.01), F.leaky_relu(self.norm_g(out_g, z), 0.01)


class FFCResBlock(nn.Module):
    """Two FFC-ADAIN layers on the (local, global) split of the channels, residual on both parts."""

    def __init__(self, channels: int, feature_dim: int) -> None:
        super().__init__()
        self.conv1 = FFCADAIN(channels, feature_dim)
        self.conv2 = FFCADAIN(channels, feature_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        split = x.shape[1] - self.conv1.global_channels
        x_l, x_g = x[:, :split], x[:, split:]
        out_l, out_g = self.conv1(x_l, x_g, z)
        out_l, out_g = self.conv2(out_l, out_g, z)
        return torch.cat([x_l + out_l, x_g + out_g], dim=1)


class LNet(nn.Module):
    """``LNet()(mel (B,1,80,16), face (B,6,96,96)) -> (B,3,96,96)`` in (0, 1), BGR.

    ``face`` = concat(masked face, reference face) in [0, 1], BGR; the masked face has rows 48: zeroed.
    """

    def __init__(
        self,
        image_channels: int = 3,
        descriptor_dim: int = 512,
        levels: int = 3,
        base_channels: int = 64,
        max_channels: int = 512,
        num_res_blocks: int = 9,
    ) -> None:
        super().__init__()
        self.encoder = VisualEncoder(image_channels, base_channels, max_channels, levels)
        # decoder levels mirror the encoder pyramid, finest first; the coarsest takes the concatenated
        # (attended masked, reference) features, twice the encoder's last width
        level_channels = [(cout, cin) for cin, cout in pyramid_channels(base_channels, max_channels, levels)]
        level_channels[-1] = (2 * level_channels[-1][0], level_channels[-1][1])
        self.decoder = SkipDecoder(
            level_channels,
            lambda channels: (FFCResBlock(channels, descriptor_dim) for _ in range(num_res_blocks)),
            image_channels,
            torch.sigmoid,
        )
        self.audio_encoder = audio_encoder()

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        masked, reference = face[:, :3], face[:, 3:]
        features = self.encoder(masked, reference)
        audio = self.audio_encoder(mel)  # [B, 1, 80, 16] -> [B, 512, 1, 1]
        return self.decoder(features, audio)  # -> [B, 3, 96, 96]


# official key -> LNet key (applied in order, before the shared pyramid/decoder rules)
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.first_(inp|ref)\.", r"encoder.\1.first."),
    (r"^encoder\.(inp|ref)_down(\d+)\.", r"encoder.\1.down\2."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.0\.normx\.", r"encoder.cross_attn.layers.\1.norm_x."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.0\.normy\.", r"encoder.cross_attn.layers.\1.norm_y."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.0\.fn\.to_out\.0\.", r"encoder.cross_attn.layers.\1.to_out."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.0\.fn\.", r"encoder.cross_attn.layers.\1."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.1\.norm\.", r"encoder.cross_attn.layers.\1.norm_ff."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.1\.fn\.net\.0\.", r"encoder.cross_attn.layers.\1.ff_in."),
    (r"^encoder\.ca\d+\.layers\.(\d+)\.1\.fn\.net\.3\.", r"encoder.cross_attn.layers.\1.ff_out."),
    (r"\.ffc\.", "."),
    (r"\.bn_(l|g)\.", r".norm_\1."),
    (r"^audio_encoder\.(\d+)\.conv_block\.0\.", r"audio_encoder.\1.conv."),
    (r"^audio_encoder\.(\d+)\.conv_block\.1\.", r"audio_encoder.\1.bn."),
    *PYRAMID_KEY_RULES,
)


def fold_spectral_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each ``X.weight_orig``/``X.weight_u``/``X.weight_v`` triple by ``X.weight = weight_orig / sigma``.

    ``sigma = u · (W_mat v)`` with ``W_mat = weight_orig.reshape(out, -1)``: what torch's eval-mode
    spectral norm computes on every call (no power iteration). Incomplete or inconsistent triples are left as
    they are, so the loader reports them.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".weight_orig")]:
        prefix = key[: -len("weight_orig")]
        weight = state_dict[key]
        matrix = weight.reshape(weight.shape[0], -1)
        u, v = state_dict.get(prefix + "weight_u"), state_dict.get(prefix + "weight_v")
        if u is None or v is None or u.shape != matrix.shape[:1] or v.shape != matrix.shape[1:]:
            continue
        del out[key], out[prefix + "weight_u"], out[prefix + "weight_v"]
        sigma = torch.dot(u, torch.mv(matrix, v))
        out[prefix + "weight"] = weight / sigma
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    """Official L-Net keys (after the reference's key transform, see :func:`lnet_state_dict_from_official`)
    -> :class:`LNet` keys, with spectral norm folded into plain weights. ``model`` is unused (timm signature).
    """
    return rename_keys(fold_spectral_norm(state_dict), _KEY_RULES)


def lnet_state_dict_from_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference loader's transform of the official file's unwrapped state dict, then :func:`checkpoint_filter_fn`.

    Like the reference: every key containing ``low_res`` is dropped and every ``module.`` is removed (so the
    L-Net embedded in E-Net comes from L-Net's own file only).
    """
    cleaned = {k.replace("module.", ""): v for k, v in state_dict.items() if "low_res" not in k}
    return checkpoint_filter_fn(cleaned)


def load_lnet(path: str | Path, device: str | torch.device = "cpu") -> LNet:
    """Build :class:`LNet` from its official file (``['state_dict']``); any missing key is an error."""
    raw = read_checkpoint(path, name=CHECKPOINT_NAME, container_keys=("state_dict",))
    model, report = build_checked(
        LNet,
        raw,
        lambda state_dict, _: lnet_state_dict_from_official(state_dict),
        name=CHECKPOINT_NAME,
        allow_unexpected=True,
        device=device,
    )
    if not report.clean:
        # the reference loads with strict=False; extra entries are ignored there too, but say so
        _log.warning("%s (ignored)", report.summary())
    return model

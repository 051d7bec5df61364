"""The selftest cases: one row per golden file, naming the official files it loads and how it calls them.

A network row loads its checkpoint through the real loader, feeds the golden inputs (``in.<name>``) as tensors
and returns the outputs keyed like the golden ``out.<name>`` (without the prefix). The functions row calls the
non-network functions on ``functions.npz``, whose keys carry no prefix, for each group of inputs the file holds.
Rows take any batch size, so the compact golden set (batch item 0 of each file) runs through the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from retalk.align import LM3D_STD, align_img, calc_alignment_coefficients
from retalk.audio import mel_chunks, melspectrogram
from retalk.blend import laplacian_pyramid_blend
from retalk.coeffs import find_crop_norm_ratio, split_coeff, transform_semantic, window_indices
from retalk.engines.backends import OpenVinoNetwork, files_identity
from retalk.models import dnet, enet, face3d, ganimation, gfpgan, gpen, lnet, parsing, retinaface, s3fd
from retalk.synthetic import noise_tensor

Arrays = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Forward = Callable[[nn.Module, dict[str, Tensor], dict[str, Any]], Mapping[str, Tensor]]


@dataclass(frozen=True)
class Case:
    golden: str  # the golden file it serves, e.g. "LNet.npz"
    checkpoints: tuple[str, ...]  # the official files it loads (the runner writes synthetic ones)
    # (inputs, meta, folder, device, backend): backend "openvino" runs a network's OpenVINO model
    run: Callable[..., Outputs]
    tolerances: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # default: the reference rule


def _numpy(outputs: Mapping[str, Tensor]) -> Outputs:
    # 16-bit outputs (--precision) leave as float32; float64 sums and uint8 labels keep their type
    return {
        name: (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()
        for name, t in outputs.items()
    }


def _network(
    golden: str,
    checkpoints: tuple[str, ...],
    load: Callable[..., nn.Module],
    forward: Forward,
    tolerances: Mapping[str, Mapping[str, Any]] | None = None,
) -> Case:
    """A network row: ``load(*paths of checkpoints, device=device)``, then ``forward(model, inputs, meta)``."""

    def run(
        inputs: Arrays, meta: dict[str, Any], folder: Path, device: torch.device, backend: str = "torch"
    ) -> Outputs:
        paths = [Path(folder) / name for name in checkpoints]
        model = load(*paths, device=device)
        if backend == "openvino":
            model = _openvino(golden, model, paths, Path(folder))
        tensors = {
            key.removeprefix("in."): torch.from_numpy(np.ascontiguousarray(value)).to(device)
            for key, value in inputs.items()
            if key.startswith("in.")
        }
        with torch.inference_mode():
            outputs = _numpy(forward(model, tensors, meta))
        if isinstance(model, OpenVinoNetwork) and model.on_torch:
            raise RuntimeError(f"no OpenVINO model: {next(iter(model.on_torch.values()))}")
        return outputs

    return Case(golden, checkpoints, run, tolerances or {})


def _openvino(golden: str, model: nn.Module, paths: list[Path], folder: Path) -> OpenVinoNetwork:
    """``model`` on OpenVINO, converted on the golden inputs (the converted model in ``folder``/openvino, reused
    while the synthetic files stay as they are)."""
    return OpenVinoNetwork(golden, files_identity(paths), lambda: model, folder / "openvino")


def _enet(model: nn.Module, x: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    # the explicit noise maps meta['noise'] names, drawn for the golden batch; item i is row i of each draw
    batch, device = len(x["img_batch"]), x["img_batch"].device
    noise = [
        noise_tensor(name, shape)[:batch].to(device)
        for name, shape in zip(meta["noise"]["names"], meta["noise"]["shapes"], strict=True)
    ]
    pred, low_res = model(x["mel"], x["img_batch"], x["img_batch"][:, 3:], noise=noise)
    return {"pred": pred, "low_res": low_res}


def _ganimation(model: nn.Module, x: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    color, mask, features = model(x["img"], x["au"])
    return {
        "color_mask": color,
        "aus_mask": mask,
        "embed_sub4": features[:, :, ::4, ::4],
        "embed_chan_sum": features.double().sum(dim=(2, 3)),
        "fake_img": ganimation.compose_expression(x["img"], color, mask),
    }


def _parsenet(model: nn.Module, x: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    logits, image = model(x["x"])  # the golden file keeps the logits sub-sampled, plus the label map
    return {
        "out_mask_sub4": logits[:, :, ::4, ::4],
        "out_mask_window": logits[:, :, 192:256, 256:320],
        "out_mask_argmax": logits.argmax(dim=1).to(torch.uint8),
        "out_mask_chan_sum": logits.double().sum(dim=(2, 3)),
        "out_img": image,
    }


def _s3fd(model: nn.Module, x: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    # the golden input is BGR frames: the reference reverses them to RGB before subtracting the BGR means
    frames = x["frames_bgr_u8"].cpu().numpy()[..., ::-1]
    outputs = model(s3fd.prepare_batch(frames, feed="rgb").to(x["frames_bgr_u8"].device))
    names = [f"{kind}{level}" for level in range(1, 7) for kind in ("cls", "reg")]
    return dict(zip(names, outputs, strict=True))


# The golden names carry the reference's float fps; the exact rate of its examples/face/1.mp4 is 1350/61.
_RATES = {"25": Fraction(25), "22.131147540983605": Fraction(1350, 61)}
_RATIO_FRAMES = (0, 1, 14, 29)


def _functions(
    golden: Arrays, meta: dict[str, Any], folder: Path, device: torch.device, backend: str = "torch"
) -> Outputs:
    """Mel features (from the stored 16 kHz samples: the resampler is tested by the media tests), the 3DMM
    coefficient windows, Laplacian blending, the STIT perspective coefficients and the face3d alignment,
    for each group whose inputs the file holds."""
    out: Outputs = {}
    for source, name in (
        ("audio.wav16k_first3s", "audio.mel_first3s"),
        ("audio.wav16k_first3s_soxr_hq", "audio.mel_first3s_from_soxr_hq"),
    ):
        if source in golden:
            out[name] = melspectrogram(golden[source])
    if "audio.mel_first3s" in out:
        for fps, rate in _RATES.items():
            chunks, starts = mel_chunks(out["audio.mel_first3s"], rate)
            out[f"audio.mel_chunks_fps{fps}"] = chunks
            out[f"audio.mel_chunk_starts_fps{fps}"] = starts

    for name, value in split_coeff(golden["split_coeff.in"]).items():
        out[f"split_coeff.out_{name}"] = value
    for idx in (0, 29):
        out[f"obtain_seq_index.idx{idx}_n30"] = window_indices(idx, 30)
    semantic = golden["semantic.in"]
    for idx in _RATIO_FRAMES:
        ratio = find_crop_norm_ratio(semantic[idx : idx + 1], semantic)
        out[f"find_crop_norm_ratio.idx{idx}"] = ratio
        out[f"transform_semantic.idx{idx}"] = transform_semantic(semantic, idx, ratio)
    out["transform_semantic.idx7_no_ratio"] = transform_semantic(semantic, 7)
    ratio = find_crop_norm_ratio(golden["find_crop_norm_ratio.external_source"], semantic)
    out["find_crop_norm_ratio.external_out"] = ratio
    out["transform_semantic.idx5_external_ratio"] = transform_semantic(semantic, 5, ratio)

    # Laplacian pyramid blending (10 levels: mouth blend; 6 levels: GPEN paste)
    for name, levels in (("real", 10), ("real", 6), ("rand", 10)):
        if f"laplacian.{name}_A_u8" in golden:
            out[f"laplacian.{name}_out_levels{levels}"] = laplacian_pyramid_blend(
                golden[f"laplacian.{name}_A_u8"],
                golden[f"laplacian.{name}_B_u8"],
                golden[f"laplacian.{name}_mask_f32"],
                levels,
            )

    target = golden["calc_alignment.target"]
    out["calc_alignment.out"] = calc_alignment_coefficients(golden["calc_alignment.quad"] + 0.5, target)
    out["calc_alignment.out2"] = calc_alignment_coefficients(golden["calc_alignment.quad2"] + 0.5, target)
    out["align.lm3d_std"] = LM3D_STD
    for face in "ab":
        if f"align.img_{face}_rgb_u8" in golden:
            trans_params, im_aligned, lm_aligned, lm5p = align_img(
                golden[f"align.img_{face}_rgb_u8"], golden[f"align.lm_{face}"], LM3D_STD
            )
            out[f"align.trans_params_{face}"] = trans_params
            out[f"align.im_aligned_{face}"] = im_aligned
            out[f"align.lm_aligned_{face}"] = lm_aligned
            out[f"align.lm5p_{face}"] = lm5p
    return out


_FUNCTION_TOLERANCES: dict[str, dict[str, Any]] = {
    "audio.mel_first3s": {"atol": 1e-6},
    "audio.mel_first3s_from_soxr_hq": {"atol": 1e-6},
    **{f"audio.mel_chunks_fps{fps}": {"atol": 1e-6} for fps in _RATES},
    **{f"audio.mel_chunk_starts_fps{fps}": {"exact": True} for fps in _RATES},
    **{f"split_coeff.out_{k}": {"exact": True} for k in ("id", "exp", "tex", "angle", "gamma", "trans")},
    "obtain_seq_index.idx0_n30": {"exact": True},
    "obtain_seq_index.idx29_n30": {"exact": True},
    **{f"find_crop_norm_ratio.idx{i}": {"rtol": 1e-6} for i in _RATIO_FRAMES},
    "find_crop_norm_ratio.external_out": {"rtol": 1e-6},
    **{f"transform_semantic.idx{i}": {"rtol": 1e-6} for i in _RATIO_FRAMES},
    "transform_semantic.idx7_no_ratio": {"rtol": 1e-6},
    "transform_semantic.idx5_external_ratio": {"rtol": 1e-6},
    "laplacian.real_out_levels10": {"atol": 1e-3},
    "laplacian.real_out_levels6": {"atol": 1e-3},
    "laplacian.rand_out_levels10": {"atol": 1e-3},
    "calc_alignment.out": {"rtol": 1e-9},
    "calc_alignment.out2": {"rtol": 1e-9},
    "align.lm3d_std": {"exact": True},
    **{f"align.trans_params_{f}": {"rtol": 1e-6} for f in "ab"},
    **{f"align.im_aligned_{f}": {"max_grey": 1} for f in "ab"},
    **{f"align.lm_aligned_{f}": {"atol": 1e-4, "rtol": 1e-6} for f in "ab"},
    **{f"align.lm5p_{f}": {"rtol": 1e-6} for f in "ab"},
}

CASES: dict[str, Case] = {
    case.golden: case
    for case in (
        _network(
            "LNet.npz",
            (lnet.CHECKPOINT_NAME,),
            lnet.load_lnet,
            lambda m, x, _: {"out": m(x["mel"], x["face"])},
        ),
        # ENet.pth holds E-Net's own keys; its embedded L-Net comes from LNet.pth beside it
        _network("ENet.npz", (enet.CHECKPOINT_NAME, lnet.CHECKPOINT_NAME), enet.load_enet, _enet),
        _network(
            "DNet.npz",
            (dnet.CHECKPOINT_NAME,),
            dnet.load_dnet,
            lambda m, x, _: m(x["input_image"], x["driving_source"]),
        ),
        _network(
            "face3d_recon.npz",
            (face3d.CHECKPOINT_NAME,),
            face3d.load_face3d,
            lambda m, x, _: {"coeffs": m(x["x"])},
        ),
        # GFPGAN with its stored noise buffers (the reference's randomize_noise=False)
        _network(
            "GFPGANv1.3.npz",
            (gfpgan.CHECKPOINT_NAME,),
            gfpgan.load_gfpgan,
            lambda m, x, _: {"image": m(x["x"])},
        ),
        # GPEN is deterministic: its noise is its own encoder's features
        _network(
            "GPEN-BFR-512.npz", (gpen.CHECKPOINT_NAME,), gpen.load_gpen, lambda m, x, _: {"image": m(x["x"])}
        ),
        _network(
            "ParseNet.npz",
            (parsing.CHECKPOINT_NAME,),
            parsing.load_parsenet,
            _parsenet,
            # near-ties between two labels may flip under float reordering (>= 99.9 % equal pixels)
            {"out_mask_argmax": {"min_equal": 0.999}},
        ),
        _network(
            "RetinaFace-R50.npz",
            (retinaface.CHECKPOINT_NAME,),
            retinaface.load_retinaface,
            lambda m, x, _: dict(zip(("loc", "conf", "landms"), m(x["x"]), strict=True)),
        ),
        _network("S3FD.npz", (s3fd.CHECKPOINT_NAME,), s3fd.load_s3fd, _s3fd),
        _network(
            "GANimation_gen.npz", (ganimation.CHECKPOINT_NAME,), ganimation.load_ganimation, _ganimation
        ),
        Case("functions.npz", (), _functions, _FUNCTION_TOLERANCES),
    )
}

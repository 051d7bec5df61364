"""``retalk selftest --pipeline DIR``: the neural engine's stages against a recorded run of the reference pipeline.

A recording folder (``inputs.npz``, ``geometry.npz``, ``images.npz``, ``calls.npz``, ``meta.json``; the format of
``../shared/reference/pipeline``) holds the reference's frames, audio, injected and derived geometry, the images
between its stages, and the inputs and outputs of every network call, made with rule-filled weights and named
noise draws. Counts, shapes, the frame map and the noise names are read from the recording.

Two passes, with networks filled by the same weight rule:

- **per stage**: each stage is fed the recorded output of the stage before, so a difference is pinned to one
  stage: every network input retalk builds, every network output, every image, mask and piece of geometry;
- **chained**: the engine's own compositions (``retalk.engines.neural``) end to end from the frames, the audio,
  the geometry and the noise; network inputs, outputs and the frames within the looser chained bounds.

The engine differs from the reference on purpose in a few places (docs/DESIGN.md); :data:`BRIDGES` names each one
this check meets, and how it is bridged here. Nothing else may differ.

Tolerances (the recording's recommendations): exact for all that depends on no network output (geometry,
crops, inputs built from recorded images: sha256 of the float32 tensor); network outputs fed recorded inputs rel
L2 <= 2e-3 and max |diff| <= 1e-2 of the peak (coefficients 1e-4, flow field and driving source 1e-3), chained
rel L2 <= 1e-2; uint8 images after a network rel L2 <= 5e-3 with >= 98 % of the pixels identical and no
structural difference (no run of differing pixels larger than :data:`MAX_BLOB`); 0/255 masks and label maps
>= 99.5 % equal; float blend masks rel L2 <= 5e-2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile
import torch

from retalk import media
from retalk.align import (
    FACE_TEMPLATE_FFHQ_512,
    FACE_TEMPLATE_GPEN_512,
    STIT_CROP_CORNERS_256,
    calc_alignment_coefficients,
    crop_box,
    facexlib_affine,
    gpen_warp_matrices,
    quad_from_landmarks,
)
from retalk.audio import mel_chunks, melspectrogram
from retalk.checkpoints import catalogue, synth
from retalk.engines import neural
from retalk.engines import neural_steps as steps
from retalk.engines.geometry import FaceGeometry, enet_boxes
from retalk.errors import InputError
from retalk.models.parsing import FACE_LABELS, MOUTH_LABELS
from retalk.synthetic import noise_tensor, tensor_sha256

FILES = ("inputs.npz", "geometry.npz", "images.npz", "calls.npz", "meta.json")
NETWORKS = {  # the recorded run's name of each network: its official file
    "face3d": catalogue.FACE3D,
    "DNet": catalogue.DNET,
    "GPEN": catalogue.GPEN,
    "ParseNet": catalogue.PARSENET,
    "ENet": catalogue.ENET,
    "GFPGAN": catalogue.GFPGAN,
}
MAX_BLOB = 64  # pixels: a connected run of differing pixels larger than this is a shifted or swapped region
FACE_MARGIN = 0.25  # the face region of the PSNR: the E-Net box grown by this fraction of its size

# docs/DESIGN.md deviations this check meets, and how each is bridged so that nothing else can differ
BRIDGES = {
    1: "geometry: the recorded detector outputs are injected field by field into a FaceGeometry; a second check "
    "fills one from the recorded dlib points and raw boxes (FaceGeometry.from_landmarks) and must give them exactly",
    2: "head box: the reference's one box of the clip is injected for every frame (crop_boxes); the per-frame "
    "rule (align.crop_box) must give that box from the Croper's own landmarks",
    5: "noise: the recorded named draws are passed as the noise tensors, row k of a batch for frame k",
    6: "blend area: the post-processing runs on the whole frame resized to 512 x 512 (whole_frame_512), not on "
    "the engine's region at its own resolution; the engine's own area is reported as PSNR, not compared",
    7: "mel windows: the reference's windows with its tail chunk (audio.mel_chunks), not one padded window per "
    "frame (audio.mel_chunks_for_frames)",
}


# --- comparison rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    exact: bool = False
    rel_l2: float | None = None
    peak: float | None = None  # max |diff| <= peak * max |ref|
    max_abs: float | None = None
    equal: float | None = None  # fraction of identical elements (pixels for images)
    blob: int | None = None  # largest connected run of differing pixels
    blob_above: int = 0  # ... counting pixels that differ by more than this
    blob_fraction: float | None = None  # largest run as a fraction of the image
    rows_peak: float | None = None  # max |diff| <= rows_peak * max |ref row| (float64 geometry)


EXACT = Rule("exact", exact=True)
GEOMETRY = Rule("geometry |d| <= 1e-9 max", rows_peak=1e-9)
TRANS_PARAMS = Rule("rtol 1e-6", rows_peak=1e-6)
GREY1 = Rule("<= 1 grey", max_abs=1)
MEL = Rule("|d| <= 1e-6", max_abs=1e-6)
COEFFS = Rule("rel L2 <= 1e-4", rel_l2=1e-4)
SMALL_FLOAT = Rule("rel L2 <= 1e-3", rel_l2=1e-3)
NETWORK = Rule("rel L2 <= 2e-3, peak 1e-2", rel_l2=2e-3, peak=1e-2)
STORED_FP16 = Rule("rel L2 <= 2e-3", rel_l2=2e-3)  # inputs kept as float16 copies
CHAINED = Rule("rel L2 <= 1e-2", rel_l2=1e-2)
IMAGE = Rule(
    f"image: rel L2 <= 5e-3, >= 98 % equal, blob <= {MAX_BLOB}", rel_l2=5e-3, equal=0.98, blob=MAX_BLOB
)
# chained: round-off upstream moves uint8 values across truncation steps and flips a few ParseNet labels (a mask
# edge moves by a pixel), so more pixels differ, by a grey level or a few; a shift, a swap or a rounding slip
# still fails (whole contours or half the pixels)
CHAINED_IMAGE = Rule(
    "chained image: rel L2 <= 1e-2, >= 90 % equal, no run of > 4 grey differences over 0.5 % of the image",
    rel_l2=1e-2,
    equal=0.9,
    blob_above=4,
    blob_fraction=0.005,
)
MASK = Rule(">= 99.5 % equal", equal=0.995)
FLOAT_MASK = Rule("rel L2 <= 5e-2", rel_l2=5e-2)


@dataclass(frozen=True)
class Comparison:
    error: float  # the headline number: rel L2, max |diff| or fraction differing, as the rule reads
    passed: bool
    detail: str


def _largest_blob(differs: np.ndarray) -> int:
    if not differs.any():
        return 0
    stacked = differs.reshape(-1, *differs.shape[-2:]).astype(np.uint8)
    return max(
        int(cv2.connectedComponentsWithStats(d, connectivity=8)[2][1:, cv2.CC_STAT_AREA].max(initial=0))
        for d in stacked
    )


def compare(ref: Any, got: Any, rule: Rule, pixels: bool = False) -> Comparison:
    """``got`` against ``ref`` under ``rule``. ``pixels``: the last axis is a pixel's channels. (The golden
    selftest's ``retalk.selftest.compare`` judges one network output; these rules also judge images pixel by
    pixel and the shape of their differences.)"""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return Comparison(float("inf"), False, f"shape {got.shape} vs {ref.shape}")
    if ref.dtype.kind in "iub" and got.dtype.kind in "iub":  # images, masks, boxes: exact integer sums
        wide = ref.astype(np.int64)
        diff = np.abs(got.astype(np.int64) - wide)
        norm, diff_norm = (
            float(np.sqrt(wide.ravel() @ wide.ravel())),
            float(np.sqrt(diff.ravel() @ diff.ravel())),
        )
    else:
        wide = ref.astype(np.float64)
        diff = np.abs(got.astype(np.float64) - wide)
        norm, diff_norm = float(np.linalg.norm(wide)), float(np.linalg.norm(diff))
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = diff_norm / norm if norm else (0.0 if max_abs == 0 else float("inf"))
    worst = diff.max(axis=-1) if pixels else diff
    differs = worst > 0
    equal = 1 - float(differs.mean()) if differs.size else 1.0
    checks, notes = [], [f"rel L2 {rel:.2e}", f"max {max_abs:.3g}"]
    if rule.exact:
        checks.append(max_abs == 0)
    if rule.rel_l2 is not None:
        checks.append(rel <= rule.rel_l2)
    if rule.peak is not None:
        checks.append(max_abs <= rule.peak * float(np.abs(wide).max()))
    if rule.max_abs is not None:
        checks.append(max_abs <= rule.max_abs)
    if rule.rows_peak is not None:
        scale = np.abs(wide).reshape(len(wide), -1).max(axis=1)
        checks.append(bool(np.all(diff.reshape(len(wide), -1).max(axis=1) <= rule.rows_peak * scale)))
    if rule.equal is not None:
        checks.append(equal >= rule.equal)
        notes.append(f"{100 * equal:.2f} % equal")
    if rule.blob is not None or rule.blob_fraction is not None:
        large = worst > rule.blob_above
        blob = _largest_blob(large if large.ndim >= 2 else large[None])
        image = int(np.prod(large.shape[-2:])) if large.ndim >= 2 else large.size
        if rule.blob is not None:
            checks.append(blob <= rule.blob)
        if rule.blob_fraction is not None:
            checks.append(blob <= rule.blob_fraction * image)
        notes.append(f"blob {blob}" + (f" (> {rule.blob_above} grey)" if rule.blob_above else ""))
    error = 1 - equal if rule.equal is not None and rule.rel_l2 is None else (rel if rule.rel_l2 else max_abs)
    return Comparison(error, all(checks), ", ".join(notes))


@dataclass(frozen=True)
class StageRow:
    """One comparison: a network call (its input and output) or a record (an image, mask or geometry)."""

    part: str  # "per stage" or "chained"
    stage: str
    call: str  # the reference call (cNN) or record name
    input_error: float | None
    output_error: float | None
    passed: bool
    detail: str


# --- the recording -------------------------------------------------------------------------------------------


class Recording:
    """A recording folder's arrays and metadata (read lazily, file by file)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        missing = [f for f in FILES if not (self.folder / f).is_file()]
        if missing:
            raise InputError(
                f"{self.folder}: not a pipeline recording (missing {', '.join(missing)}); "
                "pass the folder that holds inputs.npz, geometry.npz, images.npz, calls.npz and meta.json"
            )
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except ValueError as err:
            raise InputError(f"{self.folder / 'meta.json'}: not JSON ({err})") from err
        self._files: dict[str, np.lib.npyio.NpzFile] = {}
        self._arrays: dict[
            str, np.ndarray
        ] = {}  # each member decompressed once (LZMA: seconds for the images)

    def __call__(self, record: str) -> np.ndarray:
        """``"images.pp_bgr"`` -> the array; a call's key (``"c21.ENet.out.pred"``) reads calls.npz."""
        file, _, key = record.partition(".")
        if file not in ("inputs", "geometry", "images", "calls"):
            file, key = "calls", record
        if file not in self._files:
            self._files[file] = np.load(self.folder / f"{file}.npz", allow_pickle=False)
        if record not in self._arrays:
            try:
                self._arrays[record] = self._files[file][key]
            except KeyError as err:
                raise InputError(f"{self.folder}/{file}.npz has no {key!r}") from err
        return self._arrays[record]

    def calls(self, network: str, role: str | None = None) -> list[dict]:
        return [
            c for c in self.meta["calls"] if c["network"] == network and (role is None or c["role"] == role)
        ]

    @property
    def rate(self) -> Fraction:
        return Fraction(self.meta["clip"]["fps"]).limit_denominator(10000)

    def noise(self, network: str, frames: Sequence[int]) -> list[torch.Tensor]:
        """The recorded noise of ``network`` for output frames ``frames``: one (n, 1, H, W) tensor per layer.
        ENet's draws are per call (``ENet/call{k}/noise{i}``, row j = the call's j-th frame), GFPGAN's per output
        frame (``GFPGAN/frame{f}/noise{i}``)."""
        draws: dict[tuple[int, int], tuple[str, list[int]]] = {}
        for entry in self.meta["noise"]["names_and_shapes"]:
            match = re.fullmatch(rf"{network}/(call|frame)(\d+)/noise(\d+)", entry["name"])
            if match:
                draws[int(match[2]), int(match[3])] = entry["name"], entry["shape"]
        layers = 1 + max(i for _, i in draws)
        if network == "GFPGAN":
            return [torch.cat([noise_tensor(*draws[f, i]) for f in frames]) for i in range(layers)]
        rows = []  # (call, row) of each output frame
        for k, call in enumerate(self.calls("ENet")):
            rows += [(k, j) for j in range(len(call["frames"]))]
        per_call = {
            k: [noise_tensor(*draws[k, i]) for i in range(layers)] for k in {rows[f][0] for f in frames}
        }
        return [
            torch.cat([per_call[rows[f][0]][i][rows[f][1] : rows[f][1] + 1] for f in frames])
            for i in range(layers)
        ]


def _rgb(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr[..., ::-1])


def _yxyx_to_boxes(boxes: np.ndarray) -> np.ndarray:
    """(y1, y2, x1, x2) rows -> (x1, y1, x2, y2)."""
    return np.asarray(boxes)[:, [2, 0, 3, 1]]


def _points(landms: np.ndarray) -> np.ndarray:
    """GPEN's RetinaFace landms rows [x0..x4, y0..y4] -> (n, 5, 2)."""
    return np.asarray(landms).reshape(-1, 2, 5).transpose(0, 2, 1)


def recorded_geometry(rec: Recording) -> tuple[FaceGeometry, FaceGeometry]:
    """The reference's geometry injected field by field (deviations 1 and 2 bridged): per source frame (the
    prepare stages) and per output frame (rendering: facexlib and the final paste saw output frames)."""
    n = len(rec("inputs.frames_bgr"))
    source = FaceGeometry(
        found=np.ones(n, bool),
        crop_boxes=np.tile(rec("geometry.crop256_region_x0_y0_x1_y1"), (n, 1)),
        crop_landmarks=rec("geometry.fan_stage1_lm"),
        stit_quads=rec("geometry.stit_quads"),
        enet_boxes=_yxyx_to_boxes(rec("geometry.enet_boxes_y1y2x1x2")),
        enhance_points=_points(rec("geometry.gpen_enhance_landms")),
        enhance_boxes=rec("geometry.gpen_enhance_dets")[:, :4],
        restore_points=np.zeros((n, 5, 2), np.float32),
        paste_points=np.zeros((n, 5, 2), np.float32),
    )
    output = dataclasses.replace(
        source.rows(rec("inputs.outframe_to_frame")),
        restore_points=rec("geometry.facexlib_landmarks5").astype(np.float32),
        paste_points=_points(rec("geometry.gpen_final_landms")),
    )
    return source, output


# --- networks: loaded once, every call recorded --------------------------------------------------------------


def _digest(value: Any, digest: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, digest)
    else:
        digest.update(repr(value).encode())


class Recorded:
    """A network that keeps every call's inputs and outputs (``calls``, until :meth:`take`), and answers an input
    it has answered before from ``memory`` (a folder: the outputs of a run weigh about a gigabyte), so a second
    check in the same process, or a chained call that rebuilt exactly the recorded input, costs nothing.
    ``inner``: a list that hooks inside the network append to; a remembered answer brings its entries back."""

    def __init__(self, module: torch.nn.Module, memory: Path, inner: list | None = None) -> None:
        self.module = module
        self.calls: list[tuple[tuple, dict, Any]] = []
        self._memory = memory
        self._inner = inner if inner is not None else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256()
        _digest(list(args) + [kwargs.get("noise")], digest)
        path = self._memory / f"{digest.hexdigest()}.pt"
        if path.is_file():
            answer = torch.load(path, map_location=args[0].device, weights_only=True)
            self._inner.extend(answer["inner"])
        else:
            start = len(self._inner)
            answer = {"out": self.module(*args, **kwargs), "inner": self._inner[start:]}
            torch.save(answer, path)
        self.calls.append((args, kwargs, answer["out"]))
        return answer["out"]

    def take(self) -> list[tuple[tuple, dict, Any]]:
        calls, self.calls = self.calls, []
        return calls


class Networks:
    """The six networks, rule-filled, each behind a :class:`Recorded`; E-Net's inner L-Net input is kept too."""

    def __init__(self, checkpoints: Path, device: torch.device) -> None:
        specs = {name: catalogue.get_spec(file) for name, file in NETWORKS.items()}
        synth(checkpoints, [file for spec in specs.values() for file in spec.files])
        self.device = device
        self._memory = tempfile.TemporaryDirectory(prefix="retalk-pipeline-calls-")
        memory = Path(self._memory.name)
        self.lnet_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.nets = {
            # built afresh, not through checkpoints.load's per-process cache: the hooks below stay on these
            name: Recorded(
                catalogue.resolve_loader(spec)(*(checkpoints / f for f in spec.files), device=device),
                memory,
                self.lnet_inputs if name == "ENet" else None,
            )
            for name, spec in specs.items()
        }
        self.nets["ENet"].module.lnet.register_forward_hook(
            lambda module, args, out: self.lnet_inputs.append(
                (args[0].detach().cpu(), args[1].detach().cpu())
            )
        )

    def __getitem__(self, name: str) -> Recorded:
        return self.nets[name]


def _cat_calls(calls: list[tuple[tuple, dict, Any]], arg: int | Callable[[Any], Any]) -> torch.Tensor:
    """An argument (index) or a function of the output of every call, concatenated over the batch."""
    parts = [call[0][arg] if isinstance(arg, int) else arg(call[2]) for call in calls]
    return torch.cat([p.detach().float().cpu() for p in parts])


def _to_u8(x: torch.Tensor, signed: bool) -> np.ndarray:
    """A network's image input (B, C, H, W) back to the uint8 image it was built from (B, H, W, C)."""
    x = (x + 1) / 2 if signed else x
    return np.rint(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def _psnr(ref: np.ndarray, got: np.ndarray) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _face_regions(boxes: np.ndarray, width: int, height: int) -> Iterator[tuple[slice, slice]]:
    for x1, y1, x2, y2 in boxes:
        mx, my = int(FACE_MARGIN * (x2 - x1)), int(FACE_MARGIN * (y2 - y1))
        yield slice(max(y1 - my, 0), min(y2 + my, height)), slice(max(x1 - mx, 0), min(x2 + mx, width))


# --- the check -----------------------------------------------------------------------------------------------


@dataclass
class PipelineReport:
    rows: list[StageRow]
    psnr: dict[str, float]  # face-region PSNR (dB) of the final frames against the reference's

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


class _Check:
    """Collects rows; one method per stage of the reference (numbered as in the recording's stage list)."""

    def __init__(self, rec: Recording, nets: Networks, report: Callable[[str], None]) -> None:
        self.rec, self.nets, self.report = rec, nets, report
        self.rows: list[StageRow] = []
        self.part = "per stage"
        self.frames_bgr = rec("inputs.frames_bgr")
        self.frames = _rgb(self.frames_bgr)
        self.height, self.width = self.frames.shape[1:3]
        self.outframes = rec("inputs.outframe_to_frame")
        self.source_geometry, self.output_geometry = recorded_geometry(rec)
        self.device = nets.device

    # rows

    def record(
        self, stage: str, name: str, ref: Any, got: Any, rule: Rule, pixels: bool = False
    ) -> Comparison:
        result = compare(ref, got, rule, pixels)
        self.rows.append(
            StageRow(
                self.part, stage, name, None, result.error, result.passed, f"{rule.name}: {result.detail}"
            )
        )
        return result

    def call(
        self,
        stage: str,
        call: dict,
        input_ok: bool,
        input_error: float,
        output: Comparison | None,
        input_rule: str,
        output_rule: str = "",
    ) -> None:
        passed = input_ok and (output is None or output.passed)
        detail = f"input {input_rule}" + (f"; output {output_rule}: {output.detail}" if output else "")
        name = f"c{call['index']:02d} {call['network']}" + (
            f" f{call['frames'][0]}" if len(call["frames"]) == 1 else ""
        )
        self.rows.append(
            StageRow(self.part, stage, name, input_error, output.error if output else None, passed, detail)
        )

    def image_inputs(
        self, stage: str, calls: list[dict], x: torch.Tensor, name: str, source: np.ndarray, signed: bool
    ) -> list[tuple[bool, float, str]]:
        """Per call: whether retalk's input equals the recorded one (sha256 per stage; the uint8 image it
        encodes under the image rule when chained) and its error in grey levels."""
        images = _to_u8(x, signed)
        out, row = [], 0
        for call in calls:
            size = call["inputs"][name]["shape"][0]
            got, ref = images[row : row + size], source[row : row + size]
            error = float(np.abs(got.astype(int) - ref.astype(int)).max())
            if self.part == "per stage":
                ok = tensor_sha256(x[row : row + size].float()) == call["inputs"][name]["sha256_float32"]
                out.append((ok, error, "sha256 of the float32 tensor"))
            else:
                result = compare(ref, got, CHAINED_IMAGE, pixels=True)
                out.append((result.passed, error, f"{CHAINED_IMAGE.name} ({result.detail})"))
            row += size
        return out

    # 0-1: geometry and crops

    def geometry(self) -> None:
        rec, stage = self.rec, "0-1 geometry"
        n = len(self.frames)
        region = rec("geometry.crop256_region_x0_y0_x1_y1")
        head = crop_box(quad_from_landmarks(rec("geometry.croper_lm68")), self.width, self.height)
        self.record(stage, "crop256_region (head box rule)", region, np.array(head), EXACT)
        raw = rec("geometry.s3fd_raw_x1y1x2y2_score")
        filled = FaceGeometry.from_landmarks(
            rec("geometry.dlib_lm68"), raw, np.ones(n, bool), self.width, self.height, np.tile(region, (n, 1))
        )
        outs = self.outframes
        self.record(
            stage, "fan_stage1_lm (from dlib)", rec("geometry.fan_stage1_lm"), filled.crop_landmarks, EXACT
        )
        padded = np.concatenate([enet_boxes(raw[i : i + 1], self.width, self.height) for i in range(n)])
        self.record(stage, "boxes_padded (from S3FD)", rec("geometry.boxes_padded_x1y1x2y2"), padded, EXACT)
        self.record(
            stage, "boxes_smoothed", rec("geometry.boxes_smoothed_x1y1x2y2"), filled.enet_boxes, EXACT
        )
        self.record(stage, "enet_boxes", self.source_geometry.enet_boxes, filled.enet_boxes, EXACT)
        self.record(
            stage,
            "gpen_enhance_landms (from dlib)",
            self.source_geometry.enhance_points,
            filled.enhance_points,
            EXACT,
        )
        self.record(
            stage,
            "gpen_enhance_dets (from dlib)",
            self.source_geometry.enhance_boxes,
            filled.enhance_boxes,
            EXACT,
        )
        self.record(
            stage,
            "gpen_final_landms (from dlib)",
            self.output_geometry.paste_points,
            filled.paste_points[outs],
            EXACT,
        )
        self.record(
            stage,
            "facexlib_landmarks5 (from dlib)",
            self.output_geometry.restore_points,
            filled.restore_points[outs],
            EXACT,
        )
        self.record(
            stage,
            "stit_quads (from FAN)",
            rec("geometry.stit_quads"),
            np.stack([quad_from_landmarks(p) for p in rec("geometry.fan_datagen_lm")]),
            GEOMETRY,
        )
        self.record(stage, "stit_quads (from dlib)", rec("geometry.stit_quads"), filled.stit_quads, GEOMETRY)
        coefficients = np.stack(
            [calc_alignment_coefficients(q + 0.5, STIT_CROP_CORNERS_256) for q in rec("geometry.stit_quads")]
        )
        self.record(
            stage, "stit_inverse_transform8", rec("geometry.stit_inverse_transform8"), coefficients, GEOMETRY
        )
        for name, points in (
            ("gpen_enhance_tfm_inv", self.source_geometry.enhance_points),
            ("gpen_final_tfm_inv", self.output_geometry.paste_points),
        ):
            inverse = np.stack([gpen_warp_matrices(p, FACE_TEMPLATE_GPEN_512)[1] for p in points])
            self.record(stage, name, rec(f"geometry.{name}"), inverse, GEOMETRY)
        affine = np.stack(
            [facexlib_affine(p, FACE_TEMPLATE_FFHQ_512) for p in self.output_geometry.restore_points]
        )
        self.record(stage, "facexlib_affine", rec("geometry.facexlib_affine"), affine, GEOMETRY)
        self.record(
            stage,
            "facexlib_inverse_affine",
            rec("geometry.facexlib_inverse_affine"),
            np.stack([cv2.invertAffineTransform(m) for m in affine]),
            GEOMETRY,
        )
        crops = np.stack([steps.crop_resized(f, region, steps.CROP_SIZE) for f in self.frames])
        self.record("0b crops", "crop256_bgr", rec("images.crop256_bgr"), crops[..., ::-1], EXACT)

    # 2: face3d

    def face3d(self) -> None:
        rec, stage = self.rec, "2 face3d"
        im224, params = steps.face3d_inputs(_rgb(rec("images.crop256_bgr")), rec("geometry.fan_stage1_lm"))
        self.record(stage, "align_trans_params", rec("geometry.align_trans_params"), params, TRANS_PARAMS)
        self.record(stage, "align_im224_rgb", rec("images.align_im224_rgb"), im224, GREY1)
        net = self.nets["face3d"]
        net.take()
        steps.face3d_coefficients(net, rec("images.align_im224_rgb"), self.device)
        self.face3d_calls(stage, net.take(), rec("images.align_im224_rgb"))

    def face3d_calls(self, stage: str, made: list, source: np.ndarray) -> None:
        calls = self.rec.calls("face3d")
        x, out = _cat_calls(made, 0), _cat_calls(made, lambda o: o)
        rule = COEFFS if self.part == "per stage" else CHAINED
        for call, (ok, error, how) in zip(
            calls, self.image_inputs(stage, calls, x, "x", source, False), strict=True
        ):
            f = call["frames"][0]
            result = compare(self.rec(call["outputs"]["coeffs"]["key"]), out[f : f + 1], rule)
            self.call(stage, call, ok, error, result, how, rule.name)

    # 3: D-Net

    def dnet(self) -> None:
        rec, stage = self.rec, "3 D-Net"
        calls = rec.calls("face3d")
        coeffs = np.concatenate([rec(c["outputs"]["coeffs"]["key"]) for c in calls])
        semantic = np.concatenate([coeffs, rec("geometry.align_trans_params").astype(np.float32)], axis=1)
        net = self.nets["DNet"]
        net.take()
        crops = _rgb(rec("images.crop256_bgr"))
        stabilized = steps.stabilize(
            net, crops, semantic, range(len(crops)), rec("inputs.expression_center")[0], self.device
        )
        self.dnet_calls(stage, net.take(), crops[..., ::-1])
        self.record(
            stage, "dnet_out_bgr", rec("images.dnet_out_bgr"), stabilized[..., ::-1], IMAGE, pixels=True
        )

    def dnet_calls(self, stage: str, made: list, source_bgr: np.ndarray) -> None:
        calls = self.rec.calls("DNet")
        x = _cat_calls(made, 0)
        driving = _cat_calls(made, 1)
        fake = _cat_calls(made, lambda o: o["fake_image"])
        flow = _cat_calls(made, lambda o: o["flow_field"])
        chained = self.part == "chained"
        inputs = self.image_inputs(
            stage, calls, x, "input_image", np.ascontiguousarray(source_bgr[..., ::-1]), True
        )
        for call, (ok, error, how) in zip(calls, inputs, strict=True):
            f = call["frames"][0]
            drive = compare(
                self.rec(call["inputs"]["driving_source"]["key"]),
                driving[f : f + 1],
                CHAINED if chained else SMALL_FLOAT,
            )
            image = compare(
                self.rec(call["outputs"]["fake_image"]["key"]),
                fake[f : f + 1],
                CHAINED if chained else NETWORK,
            )
            field = compare(
                self.rec(call["outputs"]["flow_field"]["key"]),
                flow[f : f + 1],
                CHAINED if chained else SMALL_FLOAT,
            )
            output = Comparison(
                image.error,
                image.passed and field.passed,
                f"fake_image {image.detail}; flow_field {field.detail}",
            )
            self.call(
                stage,
                call,
                ok and drive.passed,
                error,
                output,
                f"{how}; driving_source {drive.detail}",
                "fake_image, flow_field",
            )

    # 4: audio

    def audio(self) -> None:
        rec, stage = self.rec, "4 audio"
        wav = self.wav16k()
        self.record(stage, "wav16k (from the WAV samples)", rec("inputs.wav16k"), wav, MEL)
        mel = melspectrogram(rec("inputs.wav16k"))
        self.record(stage, "mel_full", rec("inputs.mel_full"), mel, MEL)
        chunks, starts = mel_chunks(rec("inputs.mel_full"), rec.rate)
        self.record(stage, "mel_chunk_starts", rec("inputs.mel_chunk_starts"), starts, EXACT)
        self.record(stage, "mel_chunks", rec("inputs.mel_chunks"), chunks, MEL)

    def wav16k(self) -> np.ndarray:
        """The recorded source samples read back through retalk's own decoder and resampler."""
        with tempfile.TemporaryDirectory(prefix="retalk-pipeline-") as folder:
            path = Path(folder) / "audio.wav"
            soundfile.write(
                path,
                self.rec("inputs.audio_src_int16"),
                int(self.rec("inputs.audio_src_rate")),
                subtype="PCM_16",
            )
            return media.read_audio(path, sample_rate=16000)

    # 5: GPEN reference enhancement

    def enhance(self) -> None:
        rec, stage = self.rec, "5 GPEN enhance"
        geometry = self.source_geometry
        n = len(rec("images.dnet_out_bgr"))
        aligned, inverses = steps.gpen_align(_rgb(rec("images.dnet_out_bgr")), geometry.enhance_points[:n])
        self.record(
            stage, "gpen_aligned512_bgr", rec("images.gpen_aligned512_bgr"), aligned[..., ::-1], EXACT
        )
        gpen, parsenet = self.nets["GPEN"], self.nets["ParseNet"]
        gpen.take()
        restored = steps.restore_gpen(gpen, _rgb(rec("images.gpen_aligned512_bgr")), self.device)
        self.gpen_calls(
            stage, gpen.take(), rec("images.gpen_aligned512_bgr"), rec("images.gpen_out512_bgr"), restored
        )
        parsenet.take()
        masks = steps.parse_faces(parsenet, _rgb(rec("images.gpen_out512_bgr")), FACE_LABELS, self.device)
        self.parse_calls(stage, "gpen-enhance", parsenet.take(), rec("images.gpen_out512_bgr"))
        self.record(stage, "gpen_parse_mask512", rec("images.gpen_parse_mask512"), masks, MASK)
        masks = rec("images.gpen_parse_mask512")
        soft = np.stack(
            [
                steps.warp_back(f, m, i, (256, 256)).soft[:, :, 0]
                for f, m, i in zip(rec("images.gpen_out512_bgr"), masks, inverses, strict=True)
            ]
        )
        self.record(stage, "gpen_tmp_mask256_warped", rec("images.gpen_tmp_mask256_warped"), soft, FLOAT_MASK)
        enhanced = steps.gpen_composite(
            _rgb(rec("images.dnet_out_bgr")),
            _rgb(rec("images.gpen_out512_bgr")),
            masks,
            inverses,
            geometry.enhance_boxes[:n],
        )
        self.record(stage, "gpen_enhanced_bgr", rec("images.gpen_enhanced_bgr"), enhanced[..., ::-1], EXACT)

    def gpen_calls(
        self, stage: str, made: list, source_bgr: np.ndarray, out_bgr: np.ndarray, restored: np.ndarray | None
    ) -> None:
        calls = self.rec.calls("GPEN")
        x = _cat_calls(made, 0)
        inputs = self.image_inputs(stage, calls, x, "x", _rgb(source_bgr), True)
        for k, (call, (ok, error, how)) in enumerate(zip(calls, inputs, strict=True)):
            output = None
            if restored is not None:
                output = compare(out_bgr[k], restored[k][..., ::-1], IMAGE, pixels=True)
            self.call(stage, call, ok, error, output, how, "image (gpen_out512)")

    def parse_calls(self, stage: str, role: str, made: list, source_bgr: np.ndarray) -> None:
        calls = self.rec.calls("ParseNet", role)
        x = _cat_calls(made, 0)
        labels = _cat_calls(made, lambda o: o[0].argmax(dim=1))
        inputs = self.image_inputs(stage, calls, x, "x", _rgb(source_bgr), True)
        for k, (call, (ok, error, how)) in enumerate(zip(calls, inputs, strict=True)):
            output = compare(
                self.rec(call["outputs"]["out_mask_argmax"]["key"]), labels[k : k + 1].to(torch.uint8), MASK
            )
            self.call(stage, call, ok, error, output, how, "label map")

    # 6: the E-Net reference and E-Net

    def references(self) -> None:
        rec, stage = self.rec, "6a STIT paste"
        geometry = self.source_geometry
        enhanced = _rgb(rec("images.gpen_enhanced_bgr"))
        n = len(enhanced)
        crops = np.stack(
            [
                np.asarray(steps.stit_crop(e, q))
                for e, q in zip(enhanced, geometry.stit_quads[:n], strict=True)
            ]
        )
        self.record(stage, "stit_crops256_bgr", rec("images.stit_crops256_bgr"), crops[..., ::-1], EXACT)
        background = np.stack(
            [
                steps.crop_resized(f, b, steps.CROP_SIZE)
                for f, b in zip(self.frames[:n], geometry.crop_boxes[:n], strict=True)
            ]
        )
        self.record(
            stage,
            "stit_background256_bgr",
            rec("images.stit_background256_bgr"),
            background[..., ::-1],
            EXACT,
        )
        pasted = np.stack(
            [
                steps.stit_paste(e, _rgb(b), q)
                for e, b, q in zip(
                    enhanced, rec("images.stit_background256_bgr"), geometry.stit_quads[:n], strict=True
                )
            ]
        )
        self.record(
            stage, "stit_paste256_bgra", rec("images.stit_paste256_bgra"), pasted[..., [2, 1, 0, 3]], EXACT
        )
        refs = steps.reference_crops(
            self.frames[:n],
            geometry.crop_boxes[:n],
            enhanced,
            geometry.stit_quads[:n],
            geometry.enet_boxes[:n],
        )
        enet_in = rec("images.enet_in_u8")
        outs = self.outframes
        self.record(stage, "enet_in_u8 reference (ch 3-5)", enet_in[..., 3:], refs[outs][..., ::-1], EXACT)
        og = self.output_geometry
        faces = np.stack(
            [
                steps.crop_resized(f, b, steps.FACE_SIZE)
                for f, b in zip(self.frames[outs], og.enet_boxes, strict=True)
            ]
        )
        built = steps.enet_inputs(faces, _rgb(enet_in[..., 3:]))
        self.record("6c E-Net input", "enet_in_u8", enet_in, built, EXACT)

    def enet(self) -> None:
        rec, stage = self.rec, "6d E-Net"
        enet_in = rec("images.enet_in_u8")
        net = self.nets["ENet"]
        net.take()
        self.nets.lnet_inputs.clear()
        pred = steps.lip_sync(
            net,
            rec("inputs.mel_chunks"),
            _rgb(enet_in[..., :3]),
            _rgb(enet_in[..., 3:]),
            [z.to(self.device) for z in rec.noise("ENet", range(len(enet_in)))],
            self.device,
        )
        self.enet_calls(stage, net.take(), enet_in, pred)

    def enet_calls(self, stage: str, made: list, enet_in: np.ndarray, pred: np.ndarray) -> None:
        rec, chained = self.rec, self.part == "chained"
        net_rule = CHAINED if chained else NETWORK
        mel = _cat_calls(made, 0)
        x = _cat_calls(made, 1)
        out = _cat_calls(made, lambda o: o[0])
        low = _cat_calls(made, lambda o: o[1])
        lnet_mel = torch.cat([m for m, _ in self.nets.lnet_inputs])
        lnet_face = torch.cat([f for _, f in self.nets.lnet_inputs])
        for lcall, call in zip(rec.calls("LNet"), rec.calls("ENet"), strict=True):
            rows = slice(
                call["frames"][0], call["frames"][0] + len(call["frames"])
            )  # output frames, in order
            audio = compare(
                rec(lcall["inputs"]["audio_sequences"]["key"]), lnet_mel[rows], CHAINED if chained else EXACT
            )
            face = compare(
                rec(lcall["inputs"]["face_sequences"]["key"]),
                lnet_face[rows],
                CHAINED if chained else STORED_FP16,
            )
            output = compare(rec(call["outputs"]["low_res"]["key"]), low[rows], net_rule)
            self.call(
                stage,
                lcall,
                audio.passed and face.passed,
                face.error,
                output,
                f"audio {audio.detail}; face_sequences {face.detail}",
                net_rule.name,
            )
            ((ok, error, how),) = self.image_inputs(
                stage, [call], x[rows], "face_sequences", enet_in[rows], False
            )
            audio = compare(
                rec(call["inputs"]["audio_sequences"]["key"]), mel[rows], CHAINED if chained else EXACT
            )
            image = compare(rec(call["outputs"]["pred"]["key"]), out[rows], net_rule)
            res = compare(rec(call["outputs"]["low_res"]["key"]), low[rows], net_rule)
            output = Comparison(
                image.error, image.passed and res.passed, f"pred {image.detail}; low_res {res.detail}"
            )
            self.call(
                stage,
                call,
                ok and audio.passed,
                error,
                output,
                f"{how}; audio {audio.detail}",
                f"pred, low_res {net_rule.name}",
            )
        rule = CHAINED_IMAGE if chained else IMAGE
        self.record(
            stage, "pred_u8_384_bgr", rec("images.pred_u8_384_bgr"), pred[..., ::-1], rule, pixels=True
        )

    # 7: post-processing

    def areas(self) -> list[steps.BlendArea]:
        return [steps.whole_frame_512(self.width, self.height)] * len(self.outframes)

    def restore(self) -> None:
        rec, stage = self.rec, "7b GFPGAN"
        og = self.output_geometry
        frames = self.frames[self.outframes]
        ff = steps.paste_faces(frames, og.enet_boxes, _rgb(rec("images.pred_u8_384_bgr")))
        crops, matrices = steps.gfpgan_align(ff, og.restore_points)
        self.record(
            stage, "gfpgan_cropped512_bgr", rec("images.gfpgan_cropped512_bgr"), crops[..., ::-1], EXACT
        )
        net = self.nets["GFPGAN"]
        net.take()
        restored = steps.restore_gfpgan(
            net, _rgb(rec("images.gfpgan_cropped512_bgr")), self.gfpgan_noise(), self.device
        )
        self.gfpgan_calls(stage, net.take(), rec("images.gfpgan_cropped512_bgr"), restored)
        pasted = np.stack(
            [
                steps.paste_back_restored(f, r, m, a)
                for f, r, m, a in zip(
                    ff, _rgb(rec("images.gfpgan_restored512_bgr")), matrices, self.areas(), strict=True
                )
            ]
        )
        self.record(stage, "gfpgan_pasted_bgr", rec("images.gfpgan_pasted_bgr"), pasted[..., ::-1], EXACT)

    def gfpgan_noise(self) -> list[torch.Tensor]:
        return [z.to(self.device) for z in self.rec.noise("GFPGAN", range(len(self.outframes)))]

    def gfpgan_calls(
        self, stage: str, made: list, source_bgr: np.ndarray, restored: np.ndarray | None
    ) -> None:
        calls = self.rec.calls("GFPGAN")
        x = _cat_calls(made, 0)
        inputs = self.image_inputs(stage, calls, x, "x", _rgb(source_bgr), True)
        for k, (call, (ok, error, how)) in enumerate(zip(calls, inputs, strict=True)):
            output = None
            if restored is not None:
                output = compare(
                    self.rec("images.gfpgan_restored512_bgr")[k], restored[k][..., ::-1], IMAGE, pixels=True
                )
            self.call(stage, call, ok, error, output, how, "image (gfpgan_restored512)")

    def mouth(self) -> None:
        rec, stage = self.rec, "7c mouth mask"
        og = self.output_geometry
        pasted = _rgb(rec("images.gfpgan_pasted_bgr"))
        net = self.nets["ParseNet"]
        net.take()
        steps.mouth_masks(net, list(pasted), [tuple(b) for b in og.enet_boxes], self.device)
        made = net.take()
        source = np.stack(
            [
                steps.crop_resized(p, b, steps.ALIGNED_SIZE)
                for p, b in zip(rec("images.gfpgan_pasted_bgr"), og.enet_boxes, strict=True)
            ]
        )
        self.parse_calls(stage, "mouth-mask", made, source)
        labels = _cat_calls(made, lambda o: o[0].argmax(dim=1)).numpy()
        keep = np.isin(labels, MOUTH_LABELS).astype(np.uint8) * 255
        self.record(stage, "mouth_parse_mask512", rec("images.mouth_parse_mask512"), keep, MASK)
        masks = np.stack(
            [
                steps.mask_in_box(m, b, p.shape)
                for m, b, p in zip(rec("images.mouth_parse_mask512"), og.enet_boxes, pasted, strict=True)
            ]
        )
        self.record(stage, "mouth_mask_full", rec("images.mouth_mask_full"), masks, EXACT)
        ff = steps.paste_faces(
            self.frames[self.outframes], og.enet_boxes, _rgb(rec("images.pred_u8_384_bgr"))
        )
        pp = np.stack(
            [
                steps.blend_in_area(p, f, m, (steps.ALIGNED_SIZE,) * 2, steps.MOUTH_LEVELS)
                for p, f, m in zip(pasted, ff, rec("images.mouth_mask_full"), strict=True)
            ]
        )
        self.record("7d mouth blend", "pp_bgr", rec("images.pp_bgr"), pp[..., ::-1], EXACT)

    def final(self) -> None:
        rec, stage = self.rec, "7e final paste"
        og = self.output_geometry
        aligned, inverses = steps.gpen_align(_rgb(rec("images.pp_bgr")), og.paste_points)
        self.record(
            stage, "final_aligned512_bgr", rec("images.final_aligned512_bgr"), aligned[..., ::-1], EXACT
        )
        net = self.nets["ParseNet"]
        net.take()
        masks = steps.parse_faces(net, _rgb(rec("images.final_aligned512_bgr")), FACE_LABELS, self.device)
        self.parse_calls(stage, "final-parse", net.take(), rec("images.final_aligned512_bgr"))
        self.record(stage, "final_parse_mask512", rec("images.final_parse_mask512"), masks, MASK)
        final = steps.face_parse_paste(
            _rgb(rec("images.final_aligned512_bgr")),
            rec("images.final_parse_mask512"),
            inverses,
            self.frames[self.outframes],
            og.enet_boxes,
            self.areas(),
        )
        self.record(stage, "final_bgr", rec("images.final_bgr"), np.stack(final)[..., ::-1], EXACT)

    # the chained pass: the engine's compositions end to end

    def chained(self, native: bool) -> dict[str, float]:
        rec = self.rec
        self.part = "chained"
        for net in self.nets.nets.values():
            net.take()
        self.nets.lnet_inputs.clear()
        traced: dict[str, Any] = {}

        def trace(name: str, value: Any) -> None:
            traced[name] = np.stack(value) if isinstance(value, list) else value

        nets, device = self.nets, self.device
        self.report("chained: coefficients and references")
        semantic = neural.coefficient_rows(nets["face3d"], self.frames, self.source_geometry, device)
        self.face3d_calls("2 face3d", nets["face3d"].take(), rec("images.align_im224_rgb"))
        n = len(self.frames)
        references = neural.reference_faces(
            nets["DNet"],
            nets["GPEN"],
            nets["ParseNet"],
            self.frames,
            self.source_geometry,
            semantic,
            range(n),
            rec("inputs.expression_center")[0],
            device,
            trace,
        )
        self.dnet_calls("3 D-Net", nets["DNet"].take(), rec("images.crop256_bgr"))
        self.record(
            "3 D-Net",
            "dnet_out_bgr",
            rec("images.dnet_out_bgr"),
            traced["dnet_out"][..., ::-1],
            CHAINED_IMAGE,
            pixels=True,
        )
        self.gpen_calls(
            "5 GPEN enhance",
            nets["GPEN"].take(),
            rec("images.gpen_aligned512_bgr"),
            rec("images.gpen_out512_bgr"),
            None,
        )
        self.parse_calls(
            "5 GPEN enhance", "gpen-enhance", nets["ParseNet"].take(), rec("images.gpen_out512_bgr")
        )
        self.record(
            "5 GPEN enhance",
            "gpen_enhanced_bgr",
            rec("images.gpen_enhanced_bgr"),
            traced["gpen_enhanced"][..., ::-1],
            CHAINED_IMAGE,
            pixels=True,
        )
        wav = self.wav16k()
        mel, _ = mel_chunks(melspectrogram(wav), rec.rate)
        self.record("4 audio", "mel_chunks (from the WAV samples)", rec("inputs.mel_chunks"), mel, CHAINED)
        outs = self.outframes
        self.report("chained: rendering")

        def render(areas: list[steps.BlendArea], trace: neural.Trace) -> np.ndarray:
            return neural.render_faces(
                nets["ENet"],
                nets["GFPGAN"],
                nets["ParseNet"],
                self.frames[outs],
                self.output_geometry,
                mel,
                references[outs],
                [z.to(device) for z in rec.noise("ENet", range(len(outs)))],
                self.gfpgan_noise(),
                areas,
                device,
                trace=trace,
            )

        final = render(self.areas(), trace)
        self.enet_calls("6d E-Net", nets["ENet"].take(), rec("images.enet_in_u8"), traced["pred"])
        self.gfpgan_calls("7b GFPGAN", nets["GFPGAN"].take(), rec("images.gfpgan_cropped512_bgr"), None)
        self.record(
            "7b GFPGAN",
            "gfpgan_pasted_bgr",
            rec("images.gfpgan_pasted_bgr"),
            traced["gfpgan_pasted"][..., ::-1],
            CHAINED_IMAGE,
            pixels=True,
        )
        parse = nets["ParseNet"].take()
        m = len(outs)
        mouth_rows = _rows_of(parse, 0, m)
        mouth_source = np.stack(
            [
                steps.crop_resized(p, b, steps.ALIGNED_SIZE)
                for p, b in zip(rec("images.gfpgan_pasted_bgr"), self.output_geometry.enet_boxes, strict=True)
            ]
        )
        self.parse_calls("7c mouth mask", "mouth-mask", mouth_rows, mouth_source)
        self.record(
            "7d mouth blend",
            "pp_bgr",
            rec("images.pp_bgr"),
            traced["pp"][..., ::-1],
            CHAINED_IMAGE,
            pixels=True,
        )
        self.parse_calls(
            "7e final paste", "final-parse", _rows_of(parse, m, 2 * m), rec("images.final_aligned512_bgr")
        )
        self.record(
            "7e final paste",
            "final_bgr",
            rec("images.final_bgr"),
            final[..., ::-1],
            CHAINED_IMAGE,
            pixels=True,
        )
        psnr = {"chained, reference blend area": self.face_psnr(final)}
        if native:
            self.report("chained: rendering in the engine's own blend areas")
            areas = [steps.face_area(b, self.width, self.height) for b in self.output_geometry.enet_boxes]
            engine = render(areas, lambda name, value: None)
            psnr["chained, engine blend areas"] = self.face_psnr(engine)
        return psnr

    def face_psnr(self, frames_rgb: np.ndarray) -> float:
        ref = self.rec("images.final_bgr")
        regions = _face_regions(self.output_geometry.enet_boxes, self.width, self.height)
        ref_px = np.concatenate([r[ys, xs].reshape(-1) for r, (ys, xs) in zip(ref, regions, strict=True)])
        regions = _face_regions(self.output_geometry.enet_boxes, self.width, self.height)
        got_px = np.concatenate(
            [g[ys, xs][..., ::-1].reshape(-1) for g, (ys, xs) in zip(frames_rgb, regions, strict=True)]
        )
        return _psnr(ref_px, got_px)


def _rows_of(calls: list, start: int, stop: int) -> list:
    """The calls that carried rows [start, stop) of a run of batched calls (one stage's share)."""
    out, row = [], 0
    for call in calls:
        size = len(call[0][0])
        if start <= row < stop:
            out.append(call)
        row += size
    return out


def check_pipeline(
    folder: str | Path,
    checkpoints: str | Path,
    device: torch.device | str = "cpu",
    *,
    native: bool = True,
    report: Callable[[str], None] = lambda message: None,
) -> PipelineReport:
    """Every stage of the neural engine against the recording in ``folder``, networks rule-filled into
    ``checkpoints`` (written there if absent). ``native``: also render in the engine's own blend areas and
    report that PSNR. ``report(message)`` hears about progress."""
    rec = Recording(folder)
    device = torch.device(device)
    report("loading the rule-filled networks")
    nets = _networks(Path(checkpoints).expanduser(), str(device))
    check = _Check(rec, nets, report)
    with torch.inference_mode():
        for name, stage in (
            ("geometry", check.geometry),
            ("face3d", check.face3d),
            ("D-Net", check.dnet),
            ("audio", check.audio),
            ("GPEN", check.enhance),
            ("STIT", check.references),
            ("E-Net", check.enet),
            ("GFPGAN", check.restore),
            ("mouth", check.mouth),
            ("final paste", check.final),
        ):
            report(f"per stage: {name}")
            stage()
        psnr = check.chained(native)
    return PipelineReport(check.rows, psnr)


_NETWORKS: dict[tuple[Path, str], Networks] = {}


def _networks(checkpoints: Path, device: str) -> Networks:
    """The networks of a checkpoint folder, loaded once per process (their recorded answers kept with them)."""
    key = (checkpoints.resolve(), device)
    if key not in _NETWORKS:
        _NETWORKS.clear()  # one set at a time: they take about 1.5 GB
        _NETWORKS[key] = Networks(checkpoints, torch.device(device))
    return _NETWORKS[key]


def format_report(report: PipelineReport) -> str:
    """The rows as a table (part, stage, call, input error, output error, result, rule), then the PSNRs."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [("part", "stage", "call / record", "input err", "output err", "result", "rule and details")]
    lines += [
        (
            r.part,
            r.stage,
            r.call,
            number(r.input_error),
            number(r.output_error),
            "PASS" if r.passed else "FAIL",
            r.detail,
        )
        for r in report.rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line[:6], widths, strict=True)) + "  " + line[6]
        for line in lines
    ]
    text += [
        f"final frames, face region PSNR against the reference ({name}): {value:.2f} dB"
        for name, value in report.psnr.items()
    ]
    text += ["bridged deviations (docs/DESIGN.md): " + "; ".join(f"{k}. {v}" for k, v in BRIDGES.items())]
    return "\n".join(text)


def report_to_json(report: PipelineReport) -> dict[str, Any]:
    return {
        "rows": [dataclasses.asdict(r) for r in report.rows],
        "psnr": report.psnr,
        "passed": report.passed,
    }

"""Offline face tracking: one person's box and 68 landmarks on every frame of a clip, in one streaming pass.

The reference finds the face with seven detector passes and keeps no identity between frames (PIPELINE.md
§2, §3, §9.3, defect D4); here each frame is detected once, one person is followed (``FaceSelector``), frames
without that face are flagged instead of aborting the run (D8), and boxes and landmarks are smoothed over
time with a Savitzky-Golay filter (the paper smooths; the reference only runs a forward 5-frame box mean, D22).

Detectors and landmark models are pluggable (``FaceDetector``, ``LandmarkModel``); dlib's HOG detector and
68-point shape predictor are the defaults (they need no download); the official networks slot in where their
files exist: ``RetinaFaceDetector``, ``S3FDDetector``, ``FANLandmarks``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np
from scipy.signal import savgol_filter

from retalk.errors import CheckpointError, InputError
from retalk.registry import search_dirs

if TYPE_CHECKING:  # the adapters take models built elsewhere; torch is never imported for the dlib path
    import torch

SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
TRACK_FORMAT = 2


class FaceDetector(Protocol):
    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Faces on an (H, W, 3) uint8 RGB frame: (k, 5) float array of x1, y1, x2, y2, score."""
        ...


class LandmarkModel(Protocol):
    def landmarks(self, frame_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """68 iBUG landmarks (k, 68, 2) in frame pixels for the (k, 4) boxes x1, y1, x2, y2."""
        ...


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise InputError(f"face tracking needs (H, W, 3) uint8 RGB frames; got {frame.shape} {frame.dtype}")
    return np.ascontiguousarray(frame)  # dlib silently finds nothing on strided arrays


def find_shape_predictor(checkpoints_dir: str | Path | None = None) -> Path:
    """Locate dlib's 68-point model: the checkpoint folders (``--checkpoints``, ``$RETALK_CHECKPOINTS``, the
    user cache), then the installed face_recognition_models package (found without importing it: its
    import fails on current setuptools)."""
    places = search_dirs(checkpoints_dir)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        places.append(Path(spec.submodule_search_locations[0]) / "models")
    for place in places:
        if (place / SHAPE_PREDICTOR_FILE).is_file():
            return place / SHAPE_PREDICTOR_FILE
    raise CheckpointError(
        f"{SHAPE_PREDICTOR_FILE} not found in {', '.join(map(str, places))}; "
        f"run `retalk models fetch {SHAPE_PREDICTOR_FILE}`, pip install face-recognition-models, "
        "or pass --checkpoints DIR"
    )


class DlibDetector:
    """dlib's HOG frontal-face detector with one up-sampling pass, as the reference's Croper.

    Frames whose longer side exceeds ``max_side`` are detected on an INTER_AREA-downscaled copy and the
    boxes scaled back. The smallest detectable face is about 40 px at the detection scale, i.e. 75 px in
    a 1080p frame and 150 px in 4K with the default; ``track_faces`` only pays this scale until it has
    found the person, then detects at the face's own scale.
    """

    def __init__(self, upsample: int = 1, max_side: int | None = 1024) -> None:
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.max_side = max_side

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        frame = _check_frame(frame_rgb)
        scale = self.max_side / max(frame.shape[:2]) if self.max_side else 1.0
        return _detect_scaled(self._detect_full, frame, scale)

    def _detect_full(self, frame: np.ndarray) -> np.ndarray:
        rects, scores, _ = self._detector.run(frame, self.upsample, 0.0)
        out = np.zeros((len(rects), 5))
        for i, (rect, score) in enumerate(zip(rects, scores, strict=True)):
            # dlib's right/bottom are inclusive pixel indices; box edges are continuous coordinates.
            out[i] = rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1, score
        return out


class RetinaFaceDetector:
    """GPEN's RetinaFace-R50 (``retalk.models.retinaface``, file RetinaFace-R50.pth) as a ``FaceDetector``:
    fed BGR pixels as the reference does, faces above ``confidence_threshold`` (the reference's 0.9)."""

    def __init__(self, model: torch.nn.Module, confidence_threshold: float | None = None) -> None:
        from retalk.models import retinaface

        self.model = model
        self.confidence_threshold = (
            retinaface.CONFIDENCE_THRESHOLD if confidence_threshold is None else confidence_threshold
        )

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        from retalk.models.retinaface import detect_faces

        bgr = np.ascontiguousarray(_check_frame(frame_rgb)[..., ::-1])
        faces = detect_faces(self.model, bgr, confidence_threshold=self.confidence_threshold)
        return np.concatenate([faces.boxes, faces.scores[:, None]], axis=1).astype(np.float64)


class S3FDDetector:
    """S3FD (``retalk.models.s3fd``, file s3fd-619a316812.pth) as a ``FaceDetector``, fed as face_alignment
    feeds it (BGR order minus the Caffe means)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        import torch

        from retalk.models.s3fd import decode_detections, prepare_batch

        x = prepare_batch(_check_frame(frame_rgb)[None], feed="bgr")
        with torch.inference_mode():
            outputs = self.model(x.to(next(self.model.parameters()).device))
        return decode_detections(outputs)[0].astype(np.float64)


class FANLandmarks:
    """The 2DFAN4 landmark network (``retalk.models.fan``, file 2DFAN4-cd938726ad.zip) as a ``LandmarkModel``:
    one batched forward for all boxes of a frame, sub-pixel points (not truncated to integers)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model = model

    def landmarks(self, frame_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        from retalk.models.fan import landmarks_from_boxes

        return landmarks_from_boxes(self.model, _check_frame(frame_rgb), boxes, truncate=False)


def _detect_scaled(detect: Callable[[np.ndarray], np.ndarray], frame: np.ndarray, scale: float) -> np.ndarray:
    """``detect`` on a copy of ``frame`` downscaled by ``scale`` (INTER_AREA) when < 1, boxes mapped back."""
    if scale >= 1:
        return np.asarray(detect(frame), dtype=np.float64).reshape(-1, 5)
    h, w = frame.shape[:2]
    small_w, small_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(frame, (small_w, small_h), interpolation=cv2.INTER_AREA)
    boxes = np.asarray(detect(small), dtype=np.float64).reshape(-1, 5).copy()
    boxes[:, [0, 2]] *= w / small_w
    boxes[:, [1, 3]] *= h / small_h
    return boxes


class DlibLandmarks:
    """dlib's 68-point shape predictor (``shape_predictor_68_face_landmarks.dat``)."""

    def __init__(
        self, predictor_path: str | Path | None = None, *, checkpoints_dir: str | Path | None = None
    ) -> None:
        import dlib

        self._dlib = dlib
        path = Path(predictor_path) if predictor_path else find_shape_predictor(checkpoints_dir)
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as err:
            raise CheckpointError(f"{path}: not a dlib shape predictor ({err}); download it again") from err

    def landmarks(self, frame_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        frame = _check_frame(frame_rgb)
        out = np.zeros((len(boxes), 68, 2))
        for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64)[:, :4]):
            rect = self._dlib.rectangle(round(x1), round(y1), round(x2) - 1, round(y2) - 1)
            shape = self._predictor(frame, rect)
            out[i] = [(p.x, p.y) for p in shape.parts()]
        return out


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:4]) / 2


class FaceSelector:
    """Which face to follow, and the rule that keeps following the same person.

    ``select``: ``"largest"``; an index into the faces of the first frame that has any, ordered left to right
    (int or a digit string); or a point ``(x, y)`` (tuple or ``"x,y"``): the face containing it, else the face
    whose centre is nearest. On later frames a candidate is the tracked person only if it overlaps the last
    known box (IoU >= 0.3) or its centre is within reach of it (half the box size, growing while the face
    is missing) and nearer to it than to every other face of the previous frame, with a plausible size
    change. Otherwise the frame has no face: the selector never jumps to another person.
    """

    MIN_IOU = 0.3

    def __init__(self, select: str | int | tuple[float, float] = "largest") -> None:
        self.mode, self.value = self._parse(select)
        self._last: np.ndarray | None = None  # last chosen box (4,)
        self._others = np.zeros((0, 4))  # the previous frame's other faces
        self._gap = 0  # frames since the person was last seen

    @staticmethod
    def _parse(select: str | int | tuple[float, float]) -> tuple[str, object]:
        if isinstance(select, bool):
            raise InputError(f"face selection {select!r}: use 'largest', an index or an x,y point")
        if isinstance(select, int):
            if select < 0:
                raise InputError(f"face index {select}: must be 0 or more (faces are numbered left to right)")
            return "index", select
        if isinstance(select, str):
            text = select.strip().lower()
            if text == "largest":
                return "largest", None
            if text.isdigit():
                return "index", int(text)
            parts = text.split(",")
            try:
                if len(parts) == 2:
                    return "point", (float(parts[0]), float(parts[1]))
            except ValueError:
                pass
            raise InputError(
                f"face selection {select!r}: use 'largest', an index such as 0, or a point such as 320,180"
            )
        try:
            point = tuple(float(v) for v in select)
        except (TypeError, ValueError):
            point = ()
        if len(point) != 2:
            raise InputError(f"face selection {select!r}: a point needs exactly two coordinates x, y")
        return "point", point

    def _first(self, boxes: np.ndarray, frame_index: int) -> int:
        if self.mode == "largest":
            return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        if self.mode == "index":
            order = np.argsort(_centres(boxes)[:, 0], kind="stable")
            if self.value >= len(order):
                raise InputError(
                    f"face index {self.value}: frame {frame_index}, the first with faces, has {len(order)} "
                    f"face(s); use an index from 0 to {len(order) - 1}"
                )
            return int(order[self.value])
        px, py = self.value
        dist = np.hypot(*(_centres(boxes) - [px, py]).T)
        inside = (boxes[:, 0] <= px) & (px <= boxes[:, 2]) & (boxes[:, 1] <= py) & (py <= boxes[:, 3])
        return int(np.argmin(np.where(inside, dist, np.inf))) if inside.any() else int(np.argmin(dist))

    def _follow(self, boxes: np.ndarray) -> int | None:
        last = self._last
        size = np.sqrt((last[2] - last[0]) * (last[3] - last[1]))
        iou = _box_iou(last, boxes)
        if iou.max() >= self.MIN_IOU:
            return int(np.argmax(iou))
        centres = _centres(boxes)
        dist = np.hypot(*(centres - _centres(last[None])[0]).T) / size
        growth = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / size
        reach = min(0.5 + 0.25 * self._gap, 3.0)
        ok = (dist <= reach) & (growth > 0.5) & (growth < 2.0)
        if len(self._others):
            to_others = np.hypot(*(centres[:, None] - _centres(self._others)[None]).transpose(2, 0, 1)) / size
            ok &= dist < to_others.min(axis=1)
        return int(np.argmin(np.where(ok, dist, np.inf))) if ok.any() else None

    @property
    def last_box(self) -> np.ndarray | None:
        """The person's last known box (4,), or None before the first detection."""
        return self._last

    def choose(self, boxes: np.ndarray, frame_index: int = 0) -> int | None:
        """Index of the tracked person among this frame's (k, >=4) boxes, or None if absent."""
        boxes = np.asarray(boxes, dtype=np.float64)
        boxes = boxes[:, :4] if boxes.size else np.zeros((0, 4))
        if len(boxes) == 0:
            chosen = None
        elif self._last is None:
            chosen = self._first(boxes, frame_index)
        else:
            chosen = self._follow(boxes)
        if chosen is None:
            self._gap += 1
            self._others = boxes
        else:
            self._last, self._gap = boxes[chosen].copy(), 0
            self._others = np.delete(boxes, chosen, axis=0)
        return chosen


@dataclass
class FaceTrack:
    """One person's face over N frames. Consumers must check ``found``: faceless frames carry values
    interpolated from their neighbours (held at the ends; zeros if no frame has a face), for smoothing only."""

    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2, smoothed
    landmarks: np.ndarray  # (N, 68, 2) float64 image pixels, iBUG 68-point order, smoothed
    found: np.ndarray  # (N,) bool
    raw_boxes: np.ndarray  # (N, 4) the detector's own boxes, unsmoothed (NaN where not found)

    def __len__(self) -> int:
        return len(self.found)

    def faceless_ranges(self) -> list[tuple[int, int]]:
        return faceless_ranges(self.found)

    def save(self, path: str | Path) -> None:
        """Write an .npz (atomically: a temp file renamed onto ``path``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                format=TRACK_FORMAT,
                boxes=self.boxes,
                landmarks=self.landmarks,
                found=self.found,
                raw_boxes=self.raw_boxes,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FaceTrack:
        try:
            with np.load(path) as data:
                if int(data["format"]) != TRACK_FORMAT:
                    raise InputError(
                        f"{path}: face track format {int(data['format'])}, expected {TRACK_FORMAT}"
                    )
                track = cls(data["boxes"], data["landmarks"], data["found"].astype(bool), data["raw_boxes"])
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{path}: not a face track file ({err}); delete it to recompute") from err
        n = len(track.found)
        if (
            track.boxes.shape != (n, 4)
            or track.raw_boxes.shape != (n, 4)
            or track.landmarks.shape != (n, 68, 2)
        ):
            raise InputError(f"{path}: inconsistent face track arrays; delete it to recompute")
        return track


def faceless_ranges(found: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [a, b) runs of frames without the face."""
    return list(_runs(~found))


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """Half-open [a, b) runs where ``mask`` is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)


def _smooth_runs(values: np.ndarray, found: np.ndarray, window: int, order: int) -> np.ndarray:
    """Savitzky-Golay along axis 0 within each run of found frames (the window shrinks for short runs)."""
    out = values.copy()
    for a, b in _runs(found):
        length = min(window, b - a if (b - a) % 2 else b - a - 1)
        if length > order:
            out[a:b] = savgol_filter(values[a:b], length, order, axis=0)
    return out


def _fill_gaps(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames without a face from the nearest found frames (held at the ends)."""
    if found.all() or not found.any():
        return values if found.any() else np.zeros_like(values)
    flat = values.reshape(len(values), -1)
    known = np.flatnonzero(found)
    frames = np.arange(len(values))
    filled = np.stack([np.interp(frames, known, column[known]) for column in flat.T], axis=1)
    return filled.reshape(values.shape)


def _iter_frames(chunks: Iterable) -> Iterator[np.ndarray]:
    for chunk in chunks:
        frames = getattr(chunk, "frames", chunk)
        frames = np.asarray(frames)
        if frames.ndim == 3:
            yield frames
        elif frames.ndim == 4:
            yield from frames
        else:
            raise InputError(
                f"face tracking needs frames (H, W, 3) or chunks (n, H, W, 3); got shape {frames.shape}"
            )


def track_faces(
    chunks: Iterable,
    *,
    select: str | int | tuple[float, float] | FaceSelector = "largest",
    detector: FaceDetector | None = None,
    landmarker: LandmarkModel | None = None,
    smooth: bool = True,
    smooth_window: int = 7,
    smooth_order: int = 2,
    detect_face_size: int | None = 120,
    progress: Callable[[int], None] | None = None,
) -> FaceTrack:
    """Follow one face through a stream of frames: FrameChunks (``.frames`` (n, H, W, 3) uint8 RGB), frame
    batches or single frames. Each frame is detected once; only boxes and landmarks are kept, never frames.

    Once the person has been found, frames are detected on a copy downscaled so that their face is about
    ``detect_face_size`` px (None: always the detector's own scale): the cost no longer grows with the
    resolution (dlib: 3-6x less CPU than full resolution on the shared clips, landmarks within about 1 px
    mean; benchmarks/tracking.py), and faces down to about a third of the person's size are still seen.
    Landmarks are always computed on the full-resolution frame. ``progress(done)`` is called after every
    frame with the number of frames processed so far.
    """
    detector = detector if detector is not None else DlibDetector()
    landmarker = landmarker if landmarker is not None else DlibLandmarks()
    selector = select if isinstance(select, FaceSelector) else FaceSelector(select)

    boxes: list[np.ndarray] = []
    landmarks: list[np.ndarray] = []
    found: list[bool] = []
    for frame in _iter_frames(chunks):
        frame = _check_frame(frame)
        last = selector.last_box
        scale = 1.0
        if detect_face_size and last is not None:
            scale = detect_face_size / np.sqrt((last[2] - last[0]) * (last[3] - last[1]))
        candidates = _detect_scaled(detector.detect, frame, scale)
        chosen = selector.choose(candidates, frame_index=len(found))
        if chosen is None:
            boxes.append(np.full(4, np.nan))
            landmarks.append(np.full((68, 2), np.nan))
        else:
            box = candidates[chosen, :4]
            boxes.append(box)
            landmarks.append(np.asarray(landmarker.landmarks(frame, box[None]), dtype=np.float64)[0])
        found.append(chosen is not None)
        if progress is not None:
            progress(len(found))

    found_arr = np.array(found, dtype=bool)
    boxes_arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    landmarks_arr = np.array(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    smoothed_boxes, smoothed_landmarks = boxes_arr, landmarks_arr
    if smooth:
        smoothed_boxes = _smooth_runs(boxes_arr, found_arr, smooth_window, smooth_order)
        smoothed_landmarks = _smooth_runs(landmarks_arr, found_arr, smooth_window, smooth_order)
    return FaceTrack(
        _fill_gaps(smoothed_boxes, found_arr), _fill_gaps(smoothed_landmarks, found_arr), found_arr, boxes_arr
    )

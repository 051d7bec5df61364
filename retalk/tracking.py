"""Offline face tracking: one person's box and 68 landmarks on every frame of a clip, in one streaming pass.

The reference finds the face with seven detector passes and keeps no identity between frames; here one person is
followed (``FaceSelector``), frames without that face are flagged instead of aborting the run, and boxes and
landmarks are smoothed over time with a Savitzky-Golay filter (the paper smooths; the reference only runs a forward
5-frame box mean on the boxes it crops E-Net's input with).

A :class:`Tracker` says how: a detector (``FaceDetector``), a landmark model (``LandmarkModel``) and the settings.
Its ``identity`` names all of them, so a track cached under it is never reused by another tracker. Two ways:

- every frame detected, in batches (``key_interval=None``): the neural engine's, with the reference's own networks
  (:func:`reference_tracker`: S3FD boxes on the full-resolution frames, FAN's 68 points) or with dlib;
- detection on key frames, landmarks following the face between them (the default, the preview engine's): each
  frame's landmarks are predicted in the box the detector would give for the previous frame's landmarks, and the
  frame is detected again when the face no longer looks like it did on the last detected frame (:func:`_follows`)
  or after ``key_interval`` frames.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from retalk.checkpoints import file_identity, find_checkpoint, search_dirs
from retalk.checkpoints.catalogue import DLIB_LANDMARKS, FAN, S3FD
from retalk.errors import CheckpointError, InputError

if TYPE_CHECKING:  # the network adapters are built lazily; torch is never imported for the dlib path
    import torch

TRACK_FORMAT = 3
REFERENCE_FILES = (S3FD, FAN)  # the reference's own tracker: S3FD boxes, 2DFAN4 points
S3FD_BYTES_PER_PIXEL = 512  # peak activations of one S3FD input pixel (two 64-channel float32 maps at conv1)
FAN_ITEM_MB = 100  # peak activations of one 256 x 256 FAN crop
DETECT_BATCH = 16  # frames detected at one scale (the scale follows the face's size from batch to batch)


class FaceDetector(Protocol):
    identity: str  # the detector, its settings and its weights: part of the track's cache key

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        """Faces on each of (n, H, W, 3) uint8 RGB frames: per frame a (k, 5) float array x1, y1, x2, y2,
        score, best first."""
        ...


class LandmarkModel(Protocol):
    identity: str

    def landmarks(self, frames_rgb: Sequence[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """68 iBUG landmarks (n, 68, 2) in frame pixels: for box i (x1, y1, x2, y2) on (H, W, 3) frame i."""
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
        if (place / DLIB_LANDMARKS).is_file():
            return place / DLIB_LANDMARKS
    raise CheckpointError(
        f"{DLIB_LANDMARKS} not found in {', '.join(map(str, places))}; "
        f"run `retalk models fetch {DLIB_LANDMARKS}`, pip install face-recognition-models, "
        "or pass --checkpoints DIR"
    )


@functools.cache
def _hog_detector():  # built once per process: about a second
    import dlib

    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=2)
def _shape_predictor(path: Path, identity: str):  # read once per process: 100 MB, about two seconds
    import dlib

    try:
        return dlib.shape_predictor(str(path))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: not a dlib shape predictor ({err}); download it again") from err


class DlibDetector:
    """dlib's HOG frontal-face detector with one up-sampling pass, as the reference's Croper.

    Frames whose longer side exceeds ``max_side`` are detected on an INTER_AREA-downscaled copy and the
    boxes scaled back. The smallest detectable face is about 40 px at the detection scale, i.e. 75 px in
    a 1080p frame and 150 px in 4K with the default; the tracker only pays this scale until it has
    found the person, then detects at the face's own scale.
    """

    def __init__(self, upsample: int = 1, max_side: int | None = 1024) -> None:
        self.upsample = upsample
        self.max_side = max_side
        self.identity = f"dlib-hog-up{upsample}-max{max_side}"

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        scale = self.max_side / max(frames_rgb.shape[1:3]) if self.max_side else 1.0
        return _detect_scaled(self._detect_each, frames_rgb, scale)

    def _detect_each(self, frames: np.ndarray) -> list[np.ndarray]:
        return [self._detect_one(_check_frame(frame)) for frame in frames]

    def _detect_one(self, frame: np.ndarray) -> np.ndarray:
        rects, scores, _ = _hog_detector().run(frame, self.upsample, 0.0)
        out = np.zeros((len(rects), 5))
        for i, (rect, score) in enumerate(zip(rects, scores, strict=True)):
            # dlib's right/bottom are inclusive pixel indices; box edges are continuous coordinates.
            out[i] = rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1, score
        return out[np.argsort(-out[:, 4], kind="stable")]


class DlibLandmarks:
    """dlib's 68-point shape predictor (``shape_predictor_68_face_landmarks.dat``), read on first use."""

    identity = "dlib68"

    def __init__(
        self, predictor_path: str | Path | None = None, *, checkpoints_dir: str | Path | None = None
    ) -> None:
        self.path = Path(predictor_path) if predictor_path else find_shape_predictor(checkpoints_dir)

    def landmarks(self, frames_rgb: Sequence[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        import dlib

        predictor = _shape_predictor(self.path, file_identity(self.path))
        out = np.zeros((len(boxes), 68, 2))
        for i, (frame, (x1, y1, x2, y2)) in enumerate(
            zip(frames_rgb, np.asarray(boxes, np.float64)[:, :4], strict=True)
        ):
            rect = dlib.rectangle(round(x1), round(y1), round(x2) - 1, round(y2) - 1)
            out[i] = [(p.x, p.y) for p in predictor(_check_frame(frame), rect).parts()]
        return out


class S3FDDetector:
    """S3FD (``retalk.models.s3fd``) as the reference's face_detect runs it: the full-resolution frames in RGB
    order minus the Caffe BGR means, several frames per forward pass (as many as fit the device's activation
    budget), boxes as decoded before the reference clips them at 0 and truncates them to integers."""

    def __init__(self, model: Callable[[], torch.nn.Module], identity: str) -> None:
        self._model, self.identity = model, identity

    @classmethod
    def from_file(cls, path: Path, device: torch.device | str = "cpu") -> S3FDDetector:
        from retalk.checkpoints import load_once
        from retalk.models.s3fd import load_s3fd

        return cls(functools.partial(load_once, load_s3fd, path, device), f"s3fd-rgb[{file_identity(path)}]")

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        import torch

        from retalk.device import batch_size
        from retalk.models.s3fd import decode_detections, prepare_batch

        model = self._model()
        device = next(model.parameters()).device
        per_pass = batch_size(
            device, frames_rgb.shape[1] * frames_rgb.shape[2] * S3FD_BYTES_PER_PIXEL / 2**20
        )
        found: list[np.ndarray] = []
        with torch.inference_mode():
            for a in range(0, len(frames_rgb), per_pass):
                x = prepare_batch(frames_rgb[a : a + per_pass], feed="rgb", device=device)
                found += [faces.astype(np.float64) for faces in decode_detections(model(x))]
        return found


class FANLandmarks:
    """The 2DFAN4 landmark network (``retalk.models.fan``) as face_alignment 1.3.4 runs it on a detector box,
    here on the full-resolution frame, the crops of several frames per forward pass; sub-pixel points (not
    truncated to integers)."""

    def __init__(self, model: Callable[[], torch.nn.Module], identity: str) -> None:
        self._model, self.identity = model, identity

    @classmethod
    def from_file(cls, path: Path, device: torch.device | str = "cpu") -> FANLandmarks:
        from retalk.checkpoints import load_once
        from retalk.models.fan import load_fan

        return cls(functools.partial(load_once, load_fan, path, device), f"fan[{file_identity(path)}]")

    def landmarks(self, frames_rgb: Sequence[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        from retalk.device import batch_size
        from retalk.models.fan import landmarks_from_boxes

        model = self._model()
        per_pass = batch_size(next(model.parameters()).device, FAN_ITEM_MB)
        frames = [_check_frame(frame) for frame in frames_rgb]
        parts = [
            landmarks_from_boxes(model, frames[a : a + per_pass], boxes[a : a + per_pass], truncate=False)
            for a in range(0, len(frames), per_pass)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 68, 2))


def _detect_scaled(
    detect: Callable[[np.ndarray], list[np.ndarray]],
    frames: np.ndarray,
    scale: float,
    region: tuple[int, int, int, int] | None = None,
) -> list[np.ndarray]:
    """``detect`` on the frames' ``region`` (x0, y0, x1, y1; default: all of them), downscaled by ``scale``
    (INTER_AREA) when < 1, with the boxes mapped back to frame pixels."""
    x0, y0 = 0, 0
    if region is not None:
        x0, y0, x1, y1 = region
        frames = frames[:, y0:y1, x0:x1]
    h, w = frames.shape[1:3]
    if scale < 1:
        size = max(1, round(w * scale)), max(1, round(h * scale))
        frames = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])
    fx, fy = w / frames.shape[2], h / frames.shape[1]
    found = []
    for faces in detect(frames):
        faces = np.asarray(faces, dtype=np.float64).reshape(-1, 5).copy()
        faces[:, [0, 2]] = faces[:, [0, 2]] * fx + x0
        faces[:, [1, 3]] = faces[:, [1, 3]] * fy + y0
        found.append(faces)
    return found


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


def _box_size(box: np.ndarray) -> float:
    return float(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))


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
        self._others = np.zeros((0, 4))  # the other faces of the last detection
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
        size = _box_size(last)
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

    @property
    def seen_last_frame(self) -> bool:
        return self._last is not None and self._gap == 0

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

    def keep(self, box: np.ndarray) -> None:
        """The person was followed to ``box`` without a detection (the other faces are as last detected)."""
        self._last, self._gap = np.asarray(box, dtype=np.float64)[:4].copy(), 0


@dataclass
class FaceTrack:
    """One person's face over N frames. Consumers must check ``found``: faceless frames carry values
    interpolated from their neighbours (held at the ends; zeros if no frame has a face), for smoothing only."""

    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2, smoothed
    landmarks: np.ndarray  # (N, 68, 2) float64 image pixels, iBUG 68-point order, smoothed
    found: np.ndarray  # (N,) bool
    # (N, 4) the detector's own boxes, unsmoothed (NaN where not found); on frames where the landmarks followed
    # the face without a detection, the box the detector gives for those landmarks (Tracker.key_interval)
    raw_boxes: np.ndarray
    raw_landmarks: (
        np.ndarray
    )  # (N, 68, 2) the landmark model's points in raw_boxes, unsmoothed (NaN where not found)

    def __len__(self) -> int:
        return len(self.found)

    def faceless_ranges(self) -> list[tuple[int, int]]:
        return faceless_ranges(self.found)

    def digest(self) -> str:
        """sha256 of every array of the track: the part of a cache key that says which track a result used."""
        digest = hashlib.sha256()
        for array in (self.boxes, self.landmarks, self.found, self.raw_boxes, self.raw_landmarks):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

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
                raw_landmarks=self.raw_landmarks,
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
                track = cls(
                    data["boxes"],
                    data["landmarks"],
                    data["found"].astype(bool),
                    data["raw_boxes"],
                    data["raw_landmarks"],
                )
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{path}: not a face track file ({err}); delete it to recompute") from err
        n = len(track.found)
        if (
            track.boxes.shape != (n, 4)
            or track.raw_boxes.shape != (n, 4)
            or track.landmarks.shape != (n, 68, 2)
            or track.raw_landmarks.shape != (n, 68, 2)
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
            out[a:b] = _savitzky_golay(values[a:b], length, order)
    return out


def _savitzky_golay(values: np.ndarray, window: int, order: int) -> np.ndarray:
    """scipy.signal.savgol_filter(values, window, order, axis=0) (mode "interp": each value from the polynomial
    least-squares fitted to the ``window`` values around it, the first and last ``window // 2`` from the fit to
    the first and last window) in numpy: scipy.signal takes half a second to import, on every first take."""
    n, half = len(values), window // 2
    vander = np.vander(np.arange(window, dtype=np.float64), order + 1)
    fitted = vander @ np.linalg.pinv(vander)  # row i: the fit at window position i from the window's values
    starts = np.clip(np.arange(n) - half, 0, n - window)
    weights = fitted[np.arange(n) - starts]  # (n, window)
    flat = values.reshape(n, -1)
    out = sum(weights[:, [j]] * flat[starts + j] for j in range(window))
    return out.reshape(values.shape)


def _fill_gaps(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames without a face from the nearest found frames (held at the ends)."""
    if found.all() or not found.any():
        return values if found.any() else np.zeros_like(values)
    flat = values.reshape(len(values), -1)
    known = np.flatnonzero(found)
    frames = np.arange(len(values))
    filled = np.stack([np.interp(frames, known, column[known]) for column in flat.T], axis=1)
    return filled.reshape(values.shape)


def _iter_batches(chunks: Iterable) -> Iterator[np.ndarray]:
    """(n, H, W, 3) uint8 batches from FrameChunks, batches or single frames."""
    for chunk in chunks:
        frames = np.asarray(getattr(chunk, "frames", chunk))
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise InputError(
                "face tracking needs (H, W, 3) uint8 RGB frames or chunks (n, H, W, 3); "
                f"got {frames.shape} {frames.dtype}"
            )
        yield frames


# --- following the face between key frames -------------------------------------------------------------------

_RIGID = slice(27, 48)  # nose and eyes: where the face is, whatever the mouth and brows do
PATCH_SIDE = 32  # pixels of the appearance patch
PATCH_SPAN = 5.0  # the patch covers this many rigid-point radii: the whole face


def _face_frame(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and size of a face from its landmarks: the mean and RMS radius of the nose and eye points."""
    rigid = points[_RIGID]
    centre = rigid.mean(axis=0)
    return centre, float(np.sqrt(((rigid - centre) ** 2).sum(axis=1).mean()))


def _box_in_face_frame(box: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A detector box as offsets from the landmarks' face frame (centre, size): the same for any position and
    scale of the face, so the box the detector would give can be predicted from landmarks alone."""
    centre, size = _face_frame(points)
    return (np.asarray(box[:4], np.float64) - np.tile(centre, 2)) / size


def _box_from_face_frame(offsets: np.ndarray, points: np.ndarray) -> np.ndarray:
    centre, size = _face_frame(points)
    return np.tile(centre, 2) + size * offsets


def _face_patch(frame: np.ndarray, points: np.ndarray) -> np.ndarray | None:
    """The face as a normalised PATCH_SIDE-pixel grey square around the landmarks (zero mean, unit variance), or
    None where it is flat (a blank or black frame: nothing to follow)."""
    centre, size = _face_frame(points)
    half = PATCH_SPAN * size / 2
    x0, y0 = int(np.floor(centre[0] - half)), int(np.floor(centre[1] - half))
    x1, y1 = int(np.ceil(centre[0] + half)), int(np.ceil(centre[1] + half))
    h, w = frame.shape[:2]
    inside = frame[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
    if inside.shape[0] < 2 or inside.shape[1] < 2:
        return None
    pads = (max(-y0, 0), max(y1 - h, 0), max(-x0, 0), max(x1 - w, 0))
    square = cv2.copyMakeBorder(inside, *pads, cv2.BORDER_CONSTANT, value=0) if any(pads) else inside
    patch = cv2.resize(square, (PATCH_SIDE, PATCH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    grey = patch.mean(axis=2)
    grey -= grey.mean()
    spread = float(np.sqrt((grey**2).mean()))
    return grey / spread if spread > 2.0 else None


def _correlation(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Normalised cross-correlation of two face patches (0 where either is flat)."""
    return 0.0 if a is None or b is None else float((a * b).mean())


@dataclass
class _Followed:
    """What following needs from the last detected frame."""

    points: np.ndarray  # the last frame's landmarks
    box_offsets: np.ndarray  # the detector's box in the face frame of its landmarks
    patch: np.ndarray | None  # the face as it looked when detected
    since_detection: int = 1


# --- the tracker ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tracker:
    """How a face track is made. ``identity`` names the detector, the landmark model and every setting: the
    track's cache key, so changing any of them (or a default) never reuses an old track.

    ``detect_face_size``: once the person is found, frames are detected on a copy downscaled so that the face is
    about this many pixels (None: the detector's own scale). The cost no longer grows with the resolution (dlib on
    face1, face2 and a generated 720p clip: 2-6x less CPU than at full resolution, landmarks 0.7-2.7 px mean from
    full resolution's; benchmarks/tracking.py), and faces down to about a third of the person's size are seen.

    ``key_interval``: None detects every frame (in batches). A number follows the face with landmarks between
    detections: a frame's landmarks are predicted in the box the detector gave, relative to the landmarks, on
    the last detected frame, placed on the previous frame's landmarks; the frame is accepted when its face patch
    correlates with the last detected frame's by at least ``min_correlation`` (else it is detected: a lost face,
    a cut, landmarks that drifted), and at least every ``key_interval`` frames the face is detected again (in a
    region three face sizes wide around it).

    ``smooth_window``/``smooth_order``: Savitzky-Golay over each run of found frames (None: no smoothing).
    """

    detector: FaceDetector = field(default_factory=DlibDetector)
    landmarker: LandmarkModel = field(default_factory=DlibLandmarks)
    detect_face_size: int | None = 120
    key_interval: int | None = 25
    min_correlation: float = 0.6
    smooth_window: int | None = 7
    smooth_order: int = 2

    @property
    def identity(self) -> str:
        follow = f"key{self.key_interval}-ncc{self.min_correlation}" if self.key_interval else "every-frame"
        smooth = f"savgol{self.smooth_window}-{self.smooth_order}" if self.smooth_window else "unsmoothed"
        return f"{self.detector.identity}+{self.landmarker.identity}-face{self.detect_face_size}-{follow}-{smooth}"

    def _scale(self, selector: FaceSelector) -> float:
        last = selector.last_box
        return self.detect_face_size / _box_size(last) if self.detect_face_size and last is not None else 1.0


def reference_tracker(checkpoints_dir: str | Path | None = None, device: str = "auto") -> Tracker:
    """The reference's own networks, every frame: S3FD's boxes on the full-resolution frames and FAN's 68 points
    on the device ``device`` (auto | cpu | cuda[:N]). CheckpointError naming `retalk models fetch` when either
    file is absent; the networks load on first use."""
    from retalk.device import resolve_device

    missing = []
    paths = {}
    for name in REFERENCE_FILES:
        try:
            paths[name] = find_checkpoint(name, checkpoints_dir)
        except CheckpointError:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"--detector reference needs {' and '.join(missing)}; get them with `retalk models fetch` "
            "(or pass --checkpoints DIR), or use --detector dlib"
        )
    torch_device = resolve_device(device)
    return Tracker(
        detector=S3FDDetector.from_file(paths[S3FD], torch_device),
        landmarker=FANLandmarks.from_file(paths[FAN], torch_device),
        detect_face_size=None,
        key_interval=None,
    )


def track_faces(
    chunks: Iterable,
    *,
    select: str | int | tuple[float, float] | FaceSelector = "largest",
    tracker: Tracker | None = None,
    progress: Callable[[int], None] | None = None,
) -> FaceTrack:
    """Follow one face through a stream of frames: FrameChunks (``.frames`` (n, H, W, 3) uint8 RGB), frame
    batches or single frames, as ``tracker`` says (default: :class:`Tracker`'s defaults). Only boxes and
    landmarks are kept, never frames; landmarks are always computed on the full-resolution frame.
    ``progress(done)`` is called after every frame with the number of frames processed so far."""
    tracker = tracker if tracker is not None else Tracker()
    selector = select if isinstance(select, FaceSelector) else FaceSelector(select)
    boxes: list[np.ndarray] = []
    landmarks: list[np.ndarray] = []
    followed: _Followed | None = None
    for frames in _iter_batches(chunks):
        if tracker.key_interval:
            results = []
            for frame in frames:
                result, followed = _follow_or_detect(
                    tracker, selector, frame, followed, len(boxes) + len(results)
                )
                results.append(result)
        else:
            results, a = [], 0
            while a < len(frames):  # one frame at a time until the person is found, then at the face's scale
                b = a + 1 if tracker.detect_face_size and selector.last_box is None else a + DETECT_BATCH
                results += _detect_every_frame(tracker, selector, frames[a:b], len(boxes) + a)
                a = b
        for box, points in results:
            boxes.append(box)
            landmarks.append(points)
            if progress is not None:
                progress(len(boxes))

    boxes_arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    landmarks_arr = np.array(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    found = ~np.isnan(boxes_arr[:, 0])
    smoothed_boxes, smoothed_landmarks = boxes_arr, landmarks_arr
    if tracker.smooth_window:
        smoothed_boxes = _smooth_runs(boxes_arr, found, tracker.smooth_window, tracker.smooth_order)
        smoothed_landmarks = _smooth_runs(landmarks_arr, found, tracker.smooth_window, tracker.smooth_order)
    return FaceTrack(
        _fill_gaps(smoothed_boxes, found),
        _fill_gaps(smoothed_landmarks, found),
        found,
        boxes_arr,
        landmarks_arr,
    )


_NOT_FOUND = (np.full(4, np.nan), np.full((68, 2), np.nan))


def _detect_every_frame(
    tracker: Tracker, selector: FaceSelector, frames: np.ndarray, first_index: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detect all ``frames`` (one batched call), choose the person on each, landmarks of all in one call."""
    candidates = _detect_scaled(tracker.detector.detect, frames, tracker._scale(selector))
    chosen = [selector.choose(faces, first_index + k) for k, faces in enumerate(candidates)]
    rows = [k for k, c in enumerate(chosen) if c is not None]
    boxes = np.array([candidates[k][chosen[k], :4] for k in rows]).reshape(-1, 4)
    points = tracker.landmarker.landmarks([frames[k] for k in rows], boxes) if rows else []
    results = [_NOT_FOUND] * len(frames)
    for k, box, face in zip(rows, boxes, points, strict=True):
        results[k] = (box, np.asarray(face, dtype=np.float64))
    return results


def _follow_or_detect(
    tracker: Tracker,
    selector: FaceSelector,
    frame: np.ndarray,
    followed: _Followed | None,
    index: int,
) -> tuple[tuple[np.ndarray, np.ndarray], _Followed | None]:
    """One frame of the key-frame tracker: (box, landmarks) and what the next frame follows from."""
    if followed is not None and followed.since_detection < tracker.key_interval:
        box = _box_from_face_frame(followed.box_offsets, followed.points)
        points = tracker.landmarker.landmarks([frame], box[None])[0]
        if _follows(_face_patch(frame, points), followed.patch, tracker.min_correlation):
            selector.keep(box)
            followed.points = points
            followed.since_detection += 1
            return (box, points), followed
    region = None
    if selector.seen_last_frame:  # the person is near its last box: detect around it only
        region = _region_around(selector.last_box, frame.shape)
    candidates = _detect_scaled(tracker.detector.detect, frame[None], tracker._scale(selector), region)[0]
    chosen = selector.choose(candidates, index)
    if chosen is None:
        return _NOT_FOUND, None
    box = candidates[chosen, :4]
    points = np.asarray(tracker.landmarker.landmarks([frame], box[None])[0], dtype=np.float64)
    return (box, points), _Followed(points, _box_in_face_frame(box, points), _face_patch(frame, points))


def _follows(patch: np.ndarray | None, detected: np.ndarray | None, min_correlation: float) -> bool:
    """The re-detection criterion: a followed frame is kept when its face patch correlates with the patch of the
    last detected frame by at least ``min_correlation``. Measured on face1, face2 and a generated 720p clip:
    0.73-1.0 for faces followed over 25 frames (expression and pose change); at most 0.71 with the landmarks a
    fifth of the eye distance off, 0.56 at three tenths; at most 0.28 between different people; 0 on a blank
    frame."""
    return _correlation(patch, detected) >= min_correlation


def _region_around(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The box widened by its own size on every side (the face may have moved), within the frame."""
    size = _box_size(box)
    h, w = shape[:2]
    x0, y0 = max(0, int(box[0] - size)), max(0, int(box[1] - size))
    x1, y1 = min(w, int(np.ceil(box[2] + size))), min(h, int(np.ceil(box[3] + size)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

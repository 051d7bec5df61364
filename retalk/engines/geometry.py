"""Every piece of face geometry the neural engine's stages use, per frame, in one injectable object.

A :class:`FaceGeometry` is filled from a face track (:meth:`FaceGeometry.from_track`), from 68 landmarks and
detector boxes of any tool (:meth:`FaceGeometry.from_landmarks`), or field by field (a parity test replays the
reference's recorded geometry that way). The stages never look for faces themselves.

The reference runs a detector for each of these (docs/DESIGN.md, deviation 1); here one set of 68 points per
frame gives them all, by the rules the reference's own detectors approximate:

- the 256 crop: the FFHQ head box (deviation 2: per frame, not one box for the clip);
- face3d's landmarks and the STIT quad: the 68 points mapped into the 256 crop (FAN's role);
- the E-Net box: the detector's raw box by the reference's rule (clip at 0, ``int()``, pads ``[0, 20, 0, 0]``,
  clamp, the in-place forward 5-frame mean; deviation 3 for runs shorter than 5 frames);
- the 5-point sets of GPEN's and facexlib's RetinaFace: eye centres (mean of the 6 eye points), nose tip,
  mouth corners, and GPEN's face box: the landmark box with its top raised by 30 % of its height.

Coordinates are pixels, x right, y down, pixel centres at integers; boxes are ``x1, y1, x2, y2`` with the
right/bottom edge exclusive. Rows of frames without the face (``found`` false) hold a neighbour's geometry and
must not be rendered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from retalk.align import crop_box, quad_from_landmarks
from retalk.errors import InputError
from retalk.tracking import FaceTrack

CROP_SIZE = 256  # the head crops: face3d, D-Net and GPEN's reference enhancement work in them
ENET_PADS = (0, 20, 0, 0)  # top, bottom, left, right pixels added to the detector box (--pads)
SMOOTH_FRAMES = 5  # the reference's box smoothing window
BOX_TOP_RAISE = 0.3  # GPEN's face box: the landmark box raised by this fraction of its height


def to_crop(points: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Frame points (..., 2) into the ``size`` x ``size`` resize of ``box``: the pixel-centre mapping of
    ``cv2.resize``, float64, in the reference's order of operations."""
    box = np.asarray(box)
    origin, extent = box[:2], box[2:] - box[:2]
    return (np.asarray(points) - origin + 0.5) * size / extent - 0.5


def landmark_box(lm68: np.ndarray) -> np.ndarray:
    """(..., 4) float64: the landmarks' bounding box with its top raised by 30 % of its height."""
    lm = np.asarray(lm68)
    low, high = lm.min(axis=-2), lm.max(axis=-2)
    top = low[..., 1] - BOX_TOP_RAISE * (high[..., 1] - low[..., 1])
    return np.stack([low[..., 0], top, high[..., 0], high[..., 1]], axis=-1)


def detector_points(lm68: np.ndarray) -> np.ndarray:
    """(..., 5, 2) float64: RetinaFace's five points from 68 landmarks (eye centres, nose tip, mouth corners)."""
    lm = np.asarray(lm68)
    return np.stack(
        [
            lm[..., 36:42, :].mean(axis=-2),
            lm[..., 42:48, :].mean(axis=-2),
            lm[..., 30, :],
            lm[..., 48, :],
            lm[..., 54, :],
        ],
        axis=-2,
    )


def smooth_boxes(boxes: np.ndarray, window: int = SMOOTH_FRAMES) -> np.ndarray:
    """The reference's box smoothing: box i becomes the mean of boxes i..i+window-1 (the last ``window`` near
    the end), truncated to integers and written back at once, so later windows see the smoothed rows.

    A run shorter than ``window`` is averaged whole (the reference slices it from a negative index and
    averages only its last ``window - n`` boxes: deviation 3)."""
    out = np.array(boxes, dtype=np.int64)
    n = len(out)
    for i in range(n):
        out[i] = np.mean(out[max(n - window, 0) :] if i + window > n else out[i : i + window], axis=0)
    return out


def enet_boxes(
    raw_boxes: np.ndarray, width: int, height: int, pads: tuple[int, int, int, int] = ENET_PADS
) -> np.ndarray:
    """(n, 4) int64 x1, y1, x2, y2 E-Net boxes from one run of consecutive detector boxes (n, >=4): clipped at
    0, truncated, padded (top, bottom, left, right), clamped to the frame, then smoothed."""
    top, bottom, left, right = pads
    boxes = []
    for row in np.asarray(raw_boxes):
        x1, y1, x2, y2 = (int(v) for v in np.clip(row[:4], 0, None))
        boxes.append([max(0, x1 - left), max(0, y1 - top), min(width, x2 + right), min(height, y2 + bottom)])
    return smooth_boxes(np.array(boxes, dtype=np.int64).reshape(-1, 4))


def _runs(found: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], found.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def nearest_found(found: np.ndarray) -> np.ndarray:
    """For each frame, the index of the nearest frame with a face (ties to the earlier one)."""
    with_face = np.flatnonzero(found)
    if len(with_face) == 0:
        raise InputError("no frame has a face: there is no geometry to borrow")
    frames = np.arange(len(found))
    right = np.clip(np.searchsorted(with_face, frames), 0, len(with_face) - 1)
    left = np.clip(right - 1, 0, None)
    use_left = np.abs(frames - with_face[left]) <= np.abs(with_face[right] - frames)
    return np.where(use_left, with_face[left], with_face[right])


@dataclass
class FaceGeometry:
    """Per-frame geometry of one face over N frames (see the module docstring for what each field is for)."""

    found: np.ndarray  # (N,) bool
    crop_boxes: np.ndarray  # (N, 4) int64: the frame rectangle resized to the 256 crops
    crop_landmarks: np.ndarray  # (N, 68, 2) float32: 68 points in the 256 crop, for face3d's alignment
    stit_quads: np.ndarray  # (N, 4, 2) float64: FFHQ quad in the 256 crop, for the STIT paste
    enet_boxes: np.ndarray  # (N, 4) int64: E-Net crop, prediction paste, mouth mask and final box mask
    enhance_points: np.ndarray  # (N, 5, 2) float32: GPEN's 5 points in the 256 crop (reference enhancement)
    enhance_boxes: np.ndarray  # (N, 4) float32: GPEN's face box in the 256 crop (its small-face rule)
    restore_points: np.ndarray  # (N, 5, 2) float32: facexlib's 5 points in the frame (GFPGAN)
    paste_points: np.ndarray  # (N, 5, 2) float32: GPEN's 5 points in the frame (final face-parse paste)

    _SHAPES = {
        "found": (),
        "crop_boxes": (4,),
        "crop_landmarks": (68, 2),
        "stit_quads": (4, 2),
        "enet_boxes": (4,),
        "enhance_points": (5, 2),
        "enhance_boxes": (4,),
        "restore_points": (5, 2),
        "paste_points": (5, 2),
    }

    def __post_init__(self) -> None:
        self.found = np.asarray(self.found, dtype=bool)
        n = len(self.found)
        for field in fields(self):
            value = np.asarray(getattr(self, field.name))
            expected = (n, *self._SHAPES[field.name])
            if value.shape != expected:
                raise InputError(f"face geometry: {field.name} has shape {value.shape}, expected {expected}")
            if field.name != "found" and not np.all(np.isfinite(value[self.found])):
                raise InputError(f"face geometry: {field.name} is not finite on a frame with a face")
            setattr(self, field.name, value)
        for name in ("crop_boxes", "enet_boxes"):
            boxes = getattr(self, name)[self.found]
            if np.any(boxes[:, 2:] <= boxes[:, :2]):
                raise InputError(f"face geometry: {name} has an empty box on a frame with a face")

    def __len__(self) -> int:
        return len(self.found)

    def rows(self, index: np.ndarray | slice) -> FaceGeometry:
        """The geometry of frames ``index`` (an index array, mask or slice)."""
        return FaceGeometry(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def from_landmarks(
        cls,
        landmarks: np.ndarray,
        raw_boxes: np.ndarray,
        found: np.ndarray,
        width: int,
        height: int,
        crop_boxes: np.ndarray | None = None,
    ) -> FaceGeometry:
        """Geometry from 68 landmarks per frame (N, 68, 2) and the face detector's own boxes (N, >=4, unsmoothed;
        the E-Net box follows the detector's box shape). ``crop_boxes`` (N, 4) replaces the per-frame FFHQ
        head box (e.g. the reference's one box for the clip). Faceless frames borrow the nearest face's row."""
        found = np.asarray(found, dtype=bool)
        lm = np.asarray(landmarks)
        if lm.shape != (len(found), 68, 2) or len(raw_boxes) != len(found):
            raise InputError(
                f"face geometry: {lm.shape} landmarks and {len(raw_boxes)} boxes for {len(found)} frames"
            )
        source = nearest_found(found)
        lm = lm[source]
        if crop_boxes is None:
            crop_boxes = np.array([crop_box(quad_from_landmarks(p), width, height) for p in lm], np.int64)
        crop_boxes = np.asarray(crop_boxes, dtype=np.int64)
        crop_landmarks = np.stack([to_crop(p, b) for p, b in zip(lm, crop_boxes, strict=True)]).astype(
            np.float32
        )
        boxes = np.zeros((len(found), 4), np.int64)
        for a, b in _runs(found):
            boxes[a:b] = enet_boxes(np.asarray(raw_boxes)[a:b], width, height)
        points = detector_points(lm)
        face_boxes = landmark_box(lm)
        crop_face_boxes = np.stack(
            [to_crop(fb.reshape(2, 2), cb).reshape(4) for fb, cb in zip(face_boxes, crop_boxes, strict=True)]
        )
        return cls(
            found=found,
            crop_boxes=crop_boxes,
            crop_landmarks=crop_landmarks,
            stit_quads=np.stack([quad_from_landmarks(p) for p in crop_landmarks]),
            enet_boxes=boxes[source],
            enhance_points=np.stack([to_crop(p, b) for p, b in zip(points, crop_boxes, strict=True)]).astype(
                np.float32
            ),
            enhance_boxes=crop_face_boxes.astype(np.float32),
            restore_points=points.astype(np.float32),
            paste_points=points.astype(np.float32),
        )

    @classmethod
    def from_track(cls, track: FaceTrack, width: int, height: int) -> FaceGeometry:
        """Geometry of a face track: its smoothed landmarks, and its detector's raw boxes for the E-Net box."""
        return cls.from_landmarks(track.landmarks, track.raw_boxes, track.found, width, height)

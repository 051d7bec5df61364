"""The clip's own mouths for the preview engine: exemplar mouths, after Video Rewrite (Bregler et al. 1997).

Video-only, in ``prepare`` (cached by the clip's content and its face track, so a second take skips it):
  1. pick the exemplar frames: every frame with a face, or for a long clip ``MAX_EXEMPLARS`` of them in runs
     of consecutive frames (the widest-open runs and evenly spaced ones);
  2. decode those frames once and keep each one's mouth region aligned to a canonical frame (eyes level,
     ``PATCH_EYE_DISTANCE`` pixels between them) with its lip points and shape (opening, width, roundness):
     a small patch, never a full frame.
Audio-driven, in ``listen``:
  3. choose one exemplar per output frame for the whole output at once by dynamic programming (Viterbi): a
     shape cost (opening, width, roundness against the target, and the doubt about the exemplar's opening)
     plus a cost for every cut between source
     frames that grows with their distance, while playing the source forward costs nothing, so the mouth
     texture runs smoothly instead of flickering between exemplars. The choice for an output frame depends
     only on the audio and the clip, never on how the output is cut into chunks or segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np

import retalk
from retalk import media
from retalk.cache import cache_key
from retalk.errors import InputError
from retalk.tracking import DlibLandmarks

if TYPE_CHECKING:  # the engine contract, for annotations only
    from retalk.engines import SourceClip
    from retalk.tracking import FaceTrack

# dlib 68-point (iBUG) indices
JAW = np.arange(0, 17)
EYE_LEFT, EYE_RIGHT = np.arange(36, 42), np.arange(42, 48)
NOSE_BASE = np.arange(31, 36)
SUBNASALE = 33
LIPS, OUTER_LIP, INNER_LIP = np.arange(48, 68), np.arange(48, 60), np.arange(60, 68)
INNER_UPPER, INNER_LOWER = np.array([61, 62, 63]), np.array([67, 66, 65])  # facing pairs

PATCH_EYE_DISTANCE = 96  # patch pixels per eye distance
PATCH_BOX = (-0.85, -0.10, 0.85, 1.10)  # x0, y0, x1, y1 around the subnasale, in eye distances along the face
PATCH_SIZE = (  # width, height
    round((PATCH_BOX[2] - PATCH_BOX[0]) * PATCH_EYE_DISTANCE),
    round((PATCH_BOX[3] - PATCH_BOX[1]) * PATCH_EYE_DISTANCE),
)
MAX_EXEMPLARS = 512  # about 30 MB of patches: memory and cache entries stay bounded for any clip length
RUN = 8  # a long clip keeps runs of this many consecutive frames, so that playing forward stays possible

# The choice's costs, in units of a squared shape difference of one SHAPE_SCALE.
SHAPE_SCALE = np.array([0.01, 0.04, 0.08])  # opening and width (eye distances), roundness (a ratio)
HOLD = 0.3  # showing the same exemplar again (the mouth texture freezes)
CUT = 1.5  # any cut between source frames...
CUT_PER_FRAME = 0.05  # ...plus this per frame of distance between them,
CUT_MAX = 5.0  # up to this (beyond it, distance no longer matters)
BLOCK = 2048  # output frames per dynamic-programming block: memory stays bounded for long lines

# How far each point moves down the face with the inner-lip opening (a fraction of it; negative: up), where a
# clip teaches nothing else: chin and jaw line, mouth corners and lower lip follow the jaw, the upper lip rises.
DEFAULT_MOTION = np.zeros(68)
DEFAULT_MOTION[[4, 5, 6, 7, 8, 9, 10, 11, 12]] = [0.15, 0.35, 0.6, 0.85, 1.0, 0.85, 0.6, 0.35, 0.15]
DEFAULT_MOTION[[48, 54, 60, 64, 55, 59, 56, 57, 58, 65, 66, 67]] = [0.3] * 4 + [0.8] * 2 + [1.0] * 6
DEFAULT_MOTION[[49, 50, 51, 52, 53, 61, 62, 63]] = [-0.06, -0.1, -0.1, -0.1, -0.06, -0.12, -0.12, -0.12]
MOTION_POINTS = np.r_[JAW[4:13], LIPS]  # the points whose motion a clip teaches
MIN_MOTION_SPREAD = 0.015  # eye distances: a mouth whose opening varies less teaches no motion
MIN_MOTION_FRAMES = 25

INDEX_FORMAT = 1  # bump when what the index stores changes meaning
CACHE_KIND = "mouths"


def face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors across (left eye to right eye) and down the face, and the eye distance in pixels, for
    landmarks (..., 68, 2)."""
    across = lm[..., EYE_RIGHT, :].mean(-2) - lm[..., EYE_LEFT, :].mean(-2)
    eye_distance = np.hypot(across[..., 0], across[..., 1])
    ux = across / np.maximum(eye_distance, 1e-6)[..., None]
    return ux, np.stack([-ux[..., 1], ux[..., 0]], -1), eye_distance


def inner_lip_gap(lm: np.ndarray) -> np.ndarray:
    """Mean distance between facing inner-lip points along the face's vertical axis (pixels, >= 0)."""
    _, uy, _ = face_axes(lm)
    gaps = ((lm[..., INNER_LOWER, :] - lm[..., INNER_UPPER, :]) * uy[..., None, :]).sum(-1)
    return np.maximum(gaps.mean(-1), 0.0)


def mouth_shapes(lm: np.ndarray) -> np.ndarray:
    """(..., 3) opening and width of the mouth in eye distances, and its roundness: lip thickness over
    width (pursed lips are thick and narrow), for landmarks (..., 68, 2)."""
    ux, uy, eye_distance = face_axes(lm)
    opening = inner_lip_gap(lm) / eye_distance
    width = ((lm[..., 54, :] - lm[..., 48, :]) * ux).sum(-1) / eye_distance
    height = ((lm[..., 57, :] - lm[..., 51, :]) * uy).sum(-1) / eye_distance
    return np.stack([opening, width, (height - opening) / np.maximum(width, 1e-6)], -1)


def patch_transform(lm: np.ndarray) -> np.ndarray:
    """(..., 2, 3) affine maps from frame pixels to the canonical patch of faces with landmarks (..., 68, 2):
    the face's axes become the patch's, the eye distance PATCH_EYE_DISTANCE, the subnasale a fixed point."""
    ux, uy, eye_distance = face_axes(lm)
    scale = PATCH_EYE_DISTANCE / np.maximum(eye_distance, 1e-6)
    rotation = np.stack([ux, uy], -2) * scale[..., None, None]
    corner = np.array(PATCH_BOX[:2]) * PATCH_EYE_DISTANCE
    shift = -corner - (rotation @ lm[..., SUBNASALE, :, None])[..., 0]
    return np.concatenate([rotation, shift[..., None]], -1)


def to_patch(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks (..., 68, 2) in frame pixels -> the same points in each face's canonical patch."""
    affine = patch_transform(landmarks)
    return landmarks @ np.swapaxes(affine[..., :2], -1, -2) + affine[..., None, :, 2]


class Mouth(NamedTuple):
    """One exemplar: its aligned patch and lip points (48-67) in patch pixels."""

    patch: np.ndarray  # (H, W, 3) uint8 RGB
    lips: np.ndarray  # (20, 2)


@dataclass(frozen=True)
class MouthIndex:
    """The clip's exemplar mouths: source frame, aligned patch, lip points and shape of each."""

    frames: np.ndarray  # (K,) clip-local frame of each exemplar, ascending
    patches: np.ndarray  # (K, H, W, 3) uint8 RGB, PATCH_SIZE
    lips: np.ndarray  # (K, 20, 2) points 48-67 in patch pixels
    shapes: np.ndarray  # (K, 3) mouth_shapes of each exemplar
    doubt: np.ndarray  # (K,) how far apart two estimates of its opening are (eye distances)
    rest: np.ndarray  # (68, 2) the clip's median face in patch pixels: what target shapes are posed on
    reach: float  # how wide the person opens their mouth when speaking (98th percentile, eye distances)
    pace: float  # how fast: the mean change of their opening from one frame to the next (eye distances;
    # 0 where the clip cannot tell, as for the motion)
    motion: np.ndarray  # (68,) how the person's face moves as the mouth opens (opening_motion)

    def __len__(self) -> int:
        return len(self.frames)

    def mouth(self, row: int) -> Mouth:
        return Mouth(self.patches[row], self.lips[row])


def _mouth_moves(openings: np.ndarray, samples: int) -> bool:
    """Whether a clip's mouth openings vary enough, over enough samples, to learn how the person moves."""
    return samples >= MIN_MOTION_FRAMES and openings.std() >= MIN_MOTION_SPREAD


def opening_motion(landmarks: np.ndarray) -> np.ndarray:
    """How far each point moves down the face per unit of inner-lip opening (68,), learnt from the faces
    ``landmarks`` (n, 68, 2) of one person: the least-squares slope of each point's height in the face's own
    frame (the nose fixed) against the opening. People open the mouth mostly with the lips; the jaw drops about
    half as far (a fixed model that drops it all the way moves the lower face twice as much as the person
    would). DEFAULT_MOTION when the mouth opens too little, in too few frames, to tell."""
    opening = mouth_shapes(landmarks)[:, 0]
    if not _mouth_moves(opening, len(landmarks)):
        return DEFAULT_MOTION
    heights = to_patch(landmarks)[:, MOTION_POINTS, 1] / PATCH_EYE_DISTANCE
    centred = opening - opening.mean()
    slopes = centred @ (heights - heights.mean(0)) / (centred @ centred)
    motion = np.zeros(68)
    motion[MOTION_POINTS] = np.clip(slopes, -1.0, 1.0)
    return motion


def _from_track(track: FaceTrack) -> tuple[np.ndarray, float, float, np.ndarray]:
    """The rest face, the reach, the pace and the motion of a :class:`MouthIndex` (see there)."""
    if not track.found.any():
        return np.zeros((68, 2)), 0.0, 0.0, DEFAULT_MOTION
    landmarks = track.landmarks[track.found]
    openings = mouth_shapes(landmarks)[:, 0]
    # frame-to-frame changes only between frames that both show the face
    steps = np.diff(openings)[np.diff(np.flatnonzero(track.found)) == 1]
    speaks = _mouth_moves(openings, len(steps))
    return (
        np.median(to_patch(landmarks), axis=0),
        float(np.percentile(openings, 98)),
        float(np.abs(steps).mean()) if speaks else 0.0,
        opening_motion(landmarks),
    )


def select_exemplars(found: np.ndarray, openings: np.ndarray) -> np.ndarray:
    """Clip-local frames to keep as exemplars: every frame with a face, or for a clip with more than
    MAX_EXEMPLARS of them, runs of RUN consecutive ones: the widest-open half first (a wide mouth is rare
    and without one the engine has to synthesise), then evenly spaced runs."""
    candidates = np.flatnonzero(found)
    if len(candidates) <= MAX_EXEMPLARS:
        return candidates
    runs = candidates[: len(candidates) // RUN * RUN].reshape(-1, RUN)
    keep = MAX_EXEMPLARS // RUN
    widest = np.argsort(-openings[runs].max(1), kind="stable")[: keep // 2]
    others = np.setdiff1d(np.arange(len(runs)), widest)
    spaced = others[np.unique(np.linspace(0, len(others) - 1, keep - len(widest)).round().astype(int))]
    return np.sort(runs[np.union1d(widest, spaced)].ravel())


def build_mouth_index(clip: SourceClip, report: Callable[[str, int, int], None] | None = None) -> MouthIndex:
    """Decode the exemplar frames of ``clip`` once and keep their aligned mouth patches and lip points.

    The points are the landmark model's own on the frame, not the track's: those are smoothed over several
    frames, which leaves fast lips up to a few hundredths of an eye distance off the pixels the patch shows,
    and the exemplar would be warped by that error. The model runs from two boxes: the track's smoothed one,
    here, and the detector's own, whose points the tracker kept (``FaceTrack.raw_landmarks``; the preview's
    tracker is dlib's, as here). The points are their mean, and how far the two openings differ is the
    exemplar's doubt: the choice avoids mouths whose lips the model cannot pin down."""
    track = clip.track
    openings = np.zeros(len(track))  # faceless frames have no eyes to measure by (and are no candidates)
    openings[track.found] = mouth_shapes(track.landmarks[track.found])[:, 0]
    frames = select_exemplars(track.found, openings)
    width, height = PATCH_SIZE
    patches = np.empty((len(frames), height, width, 3), np.uint8)
    on_smoothed_box = np.empty((len(frames), 68, 2))
    on_detector_box = track.raw_landmarks[frames]  # the tracker measured the detector's box on these frames
    landmarks = np.empty((len(frames), 68, 2))
    if len(frames):
        landmarker = DlibLandmarks()  # the tracker's model
        first, last = int(frames[0]), int(frames[-1])
        # the next chunk decodes on a thread while this one's mouths are measured
        decoded = media.Ahead(media.iter_frames(clip.path, clip.start + first, clip.start + last + 1))
        try:
            for chunk in decoded:
                local = chunk.start - clip.start + np.arange(len(chunk.frames))
                rows = np.searchsorted(frames, local)
                for frame, row, at in zip(chunk.frames, rows, local, strict=True):
                    if row < len(frames) and frames[row] == at:
                        on_smoothed_box[row] = landmarker.landmarks([frame], track.boxes[at][None])[0]
                        landmarks[row] = (on_smoothed_box[row] + on_detector_box[row]) / 2
                        patches[row] = cv2.warpAffine(
                            frame,
                            patch_transform(landmarks[row]),
                            PATCH_SIZE,
                            flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE,
                        )
                if report is not None:
                    report("mouths", int(local[-1]) - first + 1, last - first + 1)
        finally:
            decoded.close()
    lips = to_patch(landmarks)[:, LIPS]
    doubt = np.abs(mouth_shapes(on_smoothed_box)[:, 0] - mouth_shapes(on_detector_box)[:, 0])
    return MouthIndex(frames, patches, lips, mouth_shapes(landmarks), doubt, *_from_track(track))


def _load(path, track: FaceTrack) -> MouthIndex:
    try:
        with np.load(path) as data:
            if int(data["format"]) != INDEX_FORMAT:
                raise InputError(f"{path}: mouth index format {int(data['format'])}, expected {INDEX_FORMAT}")
            frames, patches, lips = data["frames"], data["patches"], data["lips"]
            shapes, doubt = data["shapes"], data["doubt"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: not a mouth index ({err}); delete it to rebuild") from err
    k = len(frames)
    width, height = PATCH_SIZE
    if (
        patches.shape != (k, height, width, 3)
        or lips.shape != (k, 20, 2)
        or shapes.shape != (k, 3)
        or doubt.shape != (k,)
        or (k and frames.max() >= len(track))
    ):
        raise InputError(f"{path}: inconsistent mouth index arrays; delete it to rebuild")
    return MouthIndex(frames, patches, lips, shapes, doubt, *_from_track(track))


def mouth_index(clip: SourceClip, report: Callable[[str, int, int], None]) -> tuple[MouthIndex, bool]:
    """The clip's mouth index from ``clip.cache`` when these frames with this track were indexed before
    (True), else built (and stored)."""
    key = cache_key("preview-mouths", INDEX_FORMAT, retalk.__version__, clip.content_key, clip.track.digest())
    cached = clip.cache.get(CACHE_KIND, key) if clip.cache is not None else None
    if cached is not None:
        try:
            return _load(cached, clip.track), True
        except InputError:
            cached.unlink(missing_ok=True)  # damaged entry: rebuild it
    index = build_mouth_index(clip, report)
    if clip.cache is not None:
        arrays = {name: getattr(index, name) for name in ("frames", "patches", "lips", "shapes", "doubt")}
        clip.cache.put(CACHE_KIND, key, lambda path: np.savez(path, format=INDEX_FORMAT, **arrays))
    return index, False


def _running_min(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running minimum of ``values`` and where it was taken (the latest position on ties)."""
    low = np.minimum.accumulate(values)
    return low, np.maximum.accumulate(np.where(values == low, np.arange(len(values)), 0))


def _step(cost: np.ndarray, frames: np.ndarray, follows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One transition of the dynamic programme: for each exemplar b, the cheapest way into it from the
    previous output frame's costs ``cost`` (K,), and from which exemplar. ``follows[b]``: b's source frame
    is the one right after exemplar b - 1's (playing forward is free)."""
    k = np.arange(len(cost))
    best, came = cost + HOLD, k.copy()
    forward = np.full(len(cost), np.inf)
    forward[1:] = np.where(follows[1:], cost[:-1], np.inf)
    take = forward < best
    best, came = np.where(take, forward, best), np.where(take, k - 1, came)
    # a cut a -> b: CUT + CUT_PER_FRAME * |frame b - frame a|, the min over a in two running minima (from
    # the left and from the right); beyond CUT_MAX the cheapest exemplar of all
    slope = CUT_PER_FRAME * frames
    left, left_at = _running_min(cost - slope)
    right, right_at = _running_min((cost + slope)[::-1])
    right, right_at = right[::-1], (len(cost) - 1 - right_at)[::-1]
    near = np.minimum(left + slope, right - slope)
    near_at = np.where(left + slope <= right - slope, left_at, right_at)
    cut = np.minimum(CUT + near, CUT_MAX + cost.min())
    cut_at = np.where(CUT + near <= CUT_MAX + cost.min(), near_at, int(np.argmin(cost)))
    take = cut < best
    return np.where(take, cut, best), np.where(take, cut_at, came)


def choose_mouths(index: MouthIndex, targets: np.ndarray) -> np.ndarray:
    """The exemplar (row of ``index``) for each output frame whose target shape is ``targets`` (n, 3): the
    path of least total shape and cut cost (see the module's step 3), solved in blocks of BLOCK frames, each
    starting from where the previous one ended. (n,) int, -1 everywhere for an empty index."""
    n = len(targets)
    if len(index) == 0:
        return np.full(n, -1)
    frames = index.frames.astype(np.float64)
    follows = np.r_[False, np.diff(index.frames) == 1]
    choice = np.empty(n, np.int64)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        shape_cost = (((targets[a:b, None, :] - index.shapes[None]) / SHAPE_SCALE) ** 2).sum(-1)  # (m, K)
        shape_cost += (index.doubt / SHAPE_SCALE[0]) ** 2  # a doubtful opening costs as much as a wrong one
        came = np.empty(shape_cost.shape, np.int32)
        if a == 0:
            cost = shape_cost[0]
            came[0] = -1
        else:
            start = np.full(len(index), np.inf)
            start[choice[a - 1]] = 0.0
            cost, came[0] = _step(start, frames, follows)
            cost = cost + shape_cost[0]
        for t in range(1, b - a):
            cost, came[t] = _step(cost, frames, follows)
            cost = cost + shape_cost[t]
        state = int(np.argmin(cost))
        for t in range(b - a - 1, -1, -1):
            choice[a + t] = state
            state = came[t, state]
    return choice

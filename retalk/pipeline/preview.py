"""The weight-free preview engine: a landmark-driven mouth re-animation that runs in real time on a CPU.

Per output frame the new audio gives mouth parameters (openness from loudness, width from spectral shape);
the tracked 68 points of the source frame are first moved to a CLOSED mouth (removing the old speech, the
D-Net idea), then opened to the new parameters; a piecewise-affine warp of the lower face follows the points,
the inner mouth is shaded dark with a hint of upper teeth, and the result is feather-blended into the frame.
Pixels whose warp triangles do not move are copied unchanged, so everything away from the lower face is
bit-identical to the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy.spatial import Delaunay

if TYPE_CHECKING:  # redub imports this module
    from collections.abc import Callable

    from retalk.pipeline.redub import SourceClip

# dlib 68-point (iBUG) indices
JAW = np.arange(0, 17)
EYE_LEFT, EYE_RIGHT = np.arange(36, 42), np.arange(42, 48)
NOSE_BASE = np.arange(31, 36)
OUTER_LIP, INNER_LIP = np.arange(48, 60), np.arange(60, 68)
INNER_UPPER, INNER_LOWER = np.array([61, 62, 63]), np.array([67, 66, 65])  # facing pairs


def _per_point(weights: dict[int, float]) -> np.ndarray:
    out = np.zeros(68)
    out[list(weights)] = list(weights.values())
    return out


# How far each point moves with the jaw, as a fraction of the inner lower lip's move: chin and jaw line,
# lower lip, mouth corners (the inner lower lip itself is placed exactly, see pose_mouth).
FOLLOW = _per_point(
    {4: 0.15, 5: 0.35, 6: 0.6, 7: 0.85, 8: 1.0, 9: 0.85, 10: 0.6, 11: 0.35, 12: 0.15}
    | {48: 0.3, 54: 0.3, 60: 0.3, 64: 0.3, 55: 0.8, 59: 0.8, 56: 1.0, 57: 1.0, 58: 1.0}
    | {65: 1.0, 66: 1.0, 67: 1.0}
)
# How far the upper lip rises as the mouth opens, as a fraction of the opening.
LIFT = _per_point({49: 0.06, 50: 0.1, 51: 0.1, 52: 0.1, 53: 0.06, 61: 0.12, 62: 0.12, 63: 0.12})

MAX_OPEN = 0.30  # largest inner-lip gap, in eye distances (about 18 mm for a 62 mm eye distance)
MIN_GAP = 0.01  # inner-lip gap of a closed mouth, in eye distances
MAX_WIDEN = 0.10  # largest change of mouth width, as a fraction of the mouth width
RING_SCALE = 1.7  # fixed anchor ring: jaw points pushed out from the mouth centre by this factor


@dataclass(frozen=True)
class MouthDrive:
    """Mouth parameters per output frame, from the audio."""

    openness: np.ndarray  # (n,) in [0, 1]
    width: np.ndarray  # (n,) in [-1, 1]: negative = rounded/narrow, positive = spread


def _attack_release(x: np.ndarray, dt: float, attack: float, release: float) -> np.ndarray:
    """One-pole smoothing that follows rises within ``attack`` seconds and falls within ``release``."""
    a_up, a_down = 1 - np.exp(-dt / attack), 1 - np.exp(-dt / release)
    out = np.empty_like(x)
    state = x[0] if len(x) else 0.0
    for i, v in enumerate(x):
        state += (a_up if v > state else a_down) * (v - state)
        out[i] = state
    return out


def mouth_drive(wav: np.ndarray, rate: Fraction, n_frames: int, sample_rate: int = 16000) -> MouthDrive:
    """Openness from the RMS in a window around each frame time, normalised by the clip's 95th percentile
    (robust to a few peaks); width from the spectral centroid relative to the clip's median (rounded vowels
    have low second formants: a low centroid narrows the mouth)."""
    wav = np.asarray(wav, dtype=np.float32)
    half = int(0.03 * sample_rate)  # 60 ms analysis window
    window = np.hanning(2 * half).astype(np.float32)
    padded = np.concatenate([np.zeros(half, np.float32), wav, np.zeros(3 * half, np.float32)])
    freqs = np.fft.rfftfreq(2 * half, 1 / sample_rate)
    band = (freqs > 80) & (freqs < 4000)
    # window centred half a frame after each frame starts: the frame is on screen for that span
    centres = np.array([round((Fraction(i) + Fraction(1, 2)) / rate * sample_rate) for i in range(n_frames)])
    rms, centroid = np.zeros(n_frames), np.zeros(n_frames)
    for a in range(0, n_frames, 256):  # blocks of frames: temporaries stay small for long lines
        segments = np.stack([padded[c : c + 2 * half] for c in centres[a : a + 256]]) * window
        rms[a : a + 256] = np.sqrt(np.mean(segments**2, axis=1))
        spectrum = np.abs(np.fft.rfft(segments, axis=1))[:, band]
        centroid[a : a + 256] = (spectrum * freqs[band]).sum(axis=1) / (spectrum.sum(axis=1) + 1e-12)

    loud = np.percentile(rms, 95) if n_frames else 0.0
    if loud <= 1e-8:
        return MouthDrive(np.zeros(n_frames), np.zeros(n_frames))
    gate = 0.08 * loud  # below this the mouth is closed (breath, room noise)
    openness = np.clip((rms - gate) / (loud - gate), 0, 1) ** 0.7
    voiced = openness > 0.1
    log_c = np.log(np.maximum(centroid, 1.0))
    if voiced.sum() >= 2:
        centre = np.median(log_c[voiced])
        spread = max(np.percentile(np.abs(log_c[voiced] - centre), 80), 1e-3)
        width = np.clip((log_c - centre) / spread, -1, 1) * np.minimum(openness * 3, 1)
    else:
        width = np.zeros(n_frames)
    dt = float(1 / rate)
    return MouthDrive(
        np.clip(_attack_release(openness, dt, 0.02, 0.07), 0, 1),
        np.clip(_attack_release(width, dt, 0.04, 0.08), -1, 1),
    )


def _face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors across (left eye to right eye) and down the face, and the eye distance in pixels."""
    across = lm[EYE_RIGHT].mean(0) - lm[EYE_LEFT].mean(0)
    eye_distance = float(np.hypot(*across))
    ux = across / max(eye_distance, 1e-6)
    return ux, np.array([-ux[1], ux[0]]), eye_distance


def inner_lip_gap(lm: np.ndarray) -> float:
    """Mean distance between facing inner-lip points along the face's vertical axis (pixels, >= 0)."""
    _, uy, _ = _face_axes(lm)
    return float(max(((lm[INNER_LOWER] - lm[INNER_UPPER]) @ uy).mean(), 0.0))


def pose_mouth(lm: np.ndarray, openness: float, width: float) -> np.ndarray:
    """The 68 points with the original mouth closed, then opened to ``openness`` and widened by ``width``."""
    ux, uy, eye_distance = _face_axes(lm)
    out = lm.astype(np.float64).copy()
    opening = openness * MAX_OPEN * eye_distance
    shift = opening - inner_lip_gap(lm)  # close what was open, then open to the new gap
    out += np.outer(FOLLOW * shift, uy)
    out -= np.outer(LIFT * opening, uy)
    # each inner-lower point exactly `opening` below its partner (a hair more, so no triangle collapses)
    pair_gap = (out[INNER_LOWER] - out[INNER_UPPER]) @ uy
    out[INNER_LOWER] += np.outer(opening + MIN_GAP * eye_distance - pair_gap, uy)
    if width:
        centre = out[OUTER_LIP].mean(0)
        mouth = out[np.r_[OUTER_LIP, INNER_LIP]]
        across = (mouth - centre) @ ux
        out[np.r_[OUTER_LIP, INNER_LIP]] += np.outer(across * width * MAX_WIDEN, ux)
    return out


def _control_points(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the moving points and a fixed ring of anchors around the lower face."""
    moving = np.r_[JAW[2:15], NOSE_BASE, OUTER_LIP, INNER_LIP]
    centre = lm[OUTER_LIP].mean(0)
    ring_from = np.r_[JAW[1:16], [29]]
    ring = centre + RING_SCALE * (lm[ring_from] - centre)
    return moving, ring


def _displacement(dst: np.ndarray, src: np.ndarray, box: tuple[int, int, int, int], step: int = 2):
    """Piecewise-affine inverse warp over ``box`` (x0, y0, x1, y1) as a displacement field (dx, dy):
    destination pixel + displacement = where it samples the source. Each destination triangle maps onto its
    source triangle; triangles whose corners all stay are left out (zero displacement, an exact copy). The
    field is piecewise linear, so it is evaluated every ``step`` pixels and interpolated in between."""
    x0, y0, x1, y1 = box
    tri = Delaunay(dst).simplices
    moves = np.abs(dst - src).max(1) > 1e-3
    tri = tri[moves[tri].any(1)]
    # per triangle the affine map A (2, 3) with A @ [x, y, 1] = source point, for its three corners at once
    corners = np.concatenate([dst[tri], np.ones((len(tri), 3, 1))], axis=2)  # (m, 3, 3)
    area = np.abs(np.linalg.det(corners))
    # zero-area triangles cover no pixel; the rest are painted smallest first, so that along a shared edge
    # the larger neighbour wins: a sliver (a squeezed-shut mouth) would extrapolate its steep map there
    order = np.argsort(area)
    tri, corners = tri[order][area[order] > 1e-9], corners[order][area[order] > 1e-9]
    affines = np.linalg.solve(corners, src[tri]).transpose(0, 2, 1)  # (m, 2, 3)
    h, w = (y1 - y0 + step - 1) // step + 1, (x1 - x0 + step - 1) // step + 1
    ids = np.full((h, w), -1, np.int32)
    grid = (dst - np.array([x0, y0])) / step  # destination points on the coarse grid
    for k, t in enumerate(tri):
        cv2.fillConvexPoly(ids, np.round(grid[t] * 16).astype(np.int32), k, cv2.LINE_8, 4)
    ys, xs = np.nonzero(ids >= 0)
    a = affines[ids[ys, xs]]  # (P, 2, 3) destination pixel -> source position
    px, py = (xs * step + x0).astype(np.float32), (ys * step + y0).astype(np.float32)
    coarse = np.zeros((h, w, 2), np.float32)  # (dx, dy) on the coarse grid
    coarse[ys, xs, 0] = a[:, 0, 0] * px + a[:, 0, 1] * py + a[:, 0, 2] - px
    coarse[ys, xs, 1] = a[:, 1, 0] * px + a[:, 1, 1] * py + a[:, 1, 2] - py
    # coarse sample j sits on pixel j * step: interpolate at exactly pixel / step
    at_x = np.tile(np.arange(x1 - x0, dtype=np.float32) / step, (y1 - y0, 1))
    at_y = np.tile(np.arange(y1 - y0, dtype=np.float32)[:, None] / step, (1, x1 - x0))
    dx, dy = (cv2.remap(np.ascontiguousarray(coarse[..., c]), at_x, at_y, cv2.INTER_LINEAR) for c in (0, 1))
    return dx, dy


def _shade_mouth(
    roi: np.ndarray, inner: np.ndarray, lips: np.ndarray, gap: float, eye_distance: float
) -> None:
    """Darken the open mouth (polygon ``inner`` in ROI pixels) with a soft edge and a band of upper teeth;
    the colours follow the lips (points ``lips``) so the shading matches the shot's light. A closed mouth
    still gets its dark lip line."""
    sigma = max(0.02 * eye_distance, 0.6)
    margin = int(3 * sigma) + 2
    bx0, by0 = np.maximum(np.floor(inner.min(0)).astype(int) - margin, 0)
    bx1, by1 = np.minimum(np.ceil(inner.max(0)).astype(int) + margin, roi.shape[1::-1])
    if bx1 <= bx0 or by1 <= by0:
        return
    patch = roi[by0:by1, bx0:bx1]
    inner = inner - np.array([bx0, by0])
    mask = np.zeros(patch.shape[:2], np.uint8)
    contour = np.round(inner * 16).astype(np.int32)
    cv2.fillPoly(mask, [contour], 255, cv2.LINE_AA, 4)
    cv2.polylines(mask, [contour], True, 255, max(int(round(0.025 * eye_distance)), 1), cv2.LINE_AA, 4)
    teeth = np.zeros_like(mask)
    upper = inner[[0, 1, 2, 3, 4]]  # 60, 61, 62, 63, 64: the upper inner contour, corner to corner
    lowered = upper + np.array([0.0, 0.28 * gap])
    cv2.fillPoly(teeth, [np.round(np.r_[upper, lowered[::-1]] * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    alpha = cv2.GaussianBlur(mask, (0, 0), sigma).astype(np.float32)[..., None] / 255
    teeth_alpha = cv2.GaussianBlur(np.minimum(teeth, mask), (0, 0), sigma).astype(np.float32)[..., None] / 255
    at = np.clip(np.round(lips).astype(int), 0, [roi.shape[1] - 1, roi.shape[0] - 1])
    tone = roi[at[:, 1], at[:, 0]].astype(np.float32).mean(0)
    dark = tone * np.array([0.3, 0.16, 0.16], np.float32)  # a shadowed, reddish mouth
    teeth_colour = (
        np.float32(0.5) * tone.mean() * np.array([1.6, 1.55, 1.45], np.float32) + np.float32(0.5) * tone
    )
    painted = dark * (1 - teeth_alpha * 0.6) + np.minimum(teeth_colour, 255) * teeth_alpha * 0.6
    patch[:] = np.clip(np.rint(patch * (1 - alpha) + painted * alpha), 0, 255).astype(np.uint8)


def _erase_old_mouth(
    roi: np.ndarray,
    old_inner: np.ndarray,
    new_inner: np.ndarray,
    map_x: np.ndarray,
    map_y: np.ndarray,
    eye_distance: float,
) -> None:
    """Inpaint whatever of the OLD mouth opening (teeth, dark) the warp still shows outside the NEW one: a
    mouth squeezed shut keeps slivers of it, and lip edges that dlib's straight inner-lip segments cut
    through keep some in place. Points and maps are in ROI pixels."""
    margin = int(0.1 * eye_distance) + 2
    corners = np.r_[old_inner, new_inner]
    bx0, by0 = np.maximum(np.floor(corners.min(0)).astype(int) - margin, 0)
    bx1, by1 = np.minimum(np.ceil(corners.max(0)).astype(int) + margin, roi.shape[1::-1])
    if bx1 <= bx0 or by1 <= by0:
        return
    old = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(old, [np.round(old_inner * 16).astype(np.int32)], 255, cv2.LINE_8, 4)
    shown = cv2.remap(old, map_x[by0:by1, bx0:bx1], map_y[by0:by1, bx0:bx1], cv2.INTER_NEAREST)
    new = np.zeros_like(shown)
    cv2.fillPoly(new, [np.round((new_inner - [bx0, by0]) * 16).astype(np.int32)], 255, cv2.LINE_8, 4)
    erase = cv2.dilate(np.where(new > 0, 0, shown), np.ones((3, 3), np.uint8))
    if erase.any():
        patch = roi[by0:by1, bx0:bx1]
        patch[:] = cv2.inpaint(patch, erase, max(0.03 * eye_distance, 2.0), cv2.INPAINT_TELEA)


def render_frame(
    frame: np.ndarray, lm: np.ndarray, openness: float, width: float, out: np.ndarray | None = None
) -> np.ndarray:
    """One frame re-animated into ``out`` (a new array by default; it may be ``frame`` itself). Pixels the
    warp does not move are the source's, bit for bit."""
    out = frame.copy() if out is None else out
    height, width_px = frame.shape[:2]
    moving, ring = _control_points(lm)
    posed = pose_mouth(lm, openness, width)
    src = np.r_[lm[moving], ring]
    dst = np.r_[posed[moving], ring]
    x0, y0 = np.floor(np.minimum(src.min(0), dst.min(0))).astype(int)
    x1, y1 = np.ceil(np.maximum(src.max(0), dst.max(0))).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width_px), min(y1, height)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return out
    dx, dy = _displacement(dst, src, (x0, y0, x1, y1))
    active = dx * dx + dy * dy > 1e-6
    if not active.any():
        return out
    map_x = dx + np.arange(x0, x1, dtype=np.float32)
    map_y = dy + np.arange(y0, y1, dtype=np.float32)[:, None]
    warped = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    _, _, eye_distance = _face_axes(lm)
    origin = np.array([x0, y0])
    _erase_old_mouth(
        warped,
        lm[INNER_LIP] - origin,
        posed[INNER_LIP] - origin,
        map_x - np.float32(x0),
        map_y - np.float32(y0),
        eye_distance,
    )
    _shade_mouth(
        warped, posed[INNER_LIP] - origin, posed[OUTER_LIP] - origin, inner_lip_gap(posed), eye_distance
    )
    # feather: full effect where the face moves, fading to the source towards the fixed ring
    sigma = max(0.03 * eye_distance, 1.0)
    alpha = cv2.GaussianBlur(active.astype(np.float32), (0, 0), sigma)[..., None]
    roi = out[y0:y1, x0:x1]
    source = frame[y0:y1, x0:x1]
    mixed = np.clip(np.rint(source + alpha * (warped.astype(np.float32) - source)), 0, 255).astype(np.uint8)
    np.copyto(roi, mixed, where=active[..., None])
    return out


class PreviewEngine:
    """The engine interface of :mod:`retalk.pipeline.redub` for the preview renderer."""

    name = "preview"

    def __init__(self) -> None:
        self._drive: MouthDrive | None = None
        self._clip: SourceClip | None = None

    def prepare(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> list[str]:
        """No video-only work beyond the tracking: the preview warps the tracked landmarks as they are."""
        self._clip = clip
        return []

    def listen(self, wav16k: np.ndarray, rate: Fraction, n_frames: int) -> None:
        self._drive = mouth_drive(wav16k, rate, n_frames)

    def render_chunk(
        self, frames: np.ndarray, source_index: np.ndarray, output_index: np.ndarray
    ) -> np.ndarray:
        """Clip frames ``source_index`` re-animated as output frames ``output_index``; faceless ones unchanged."""
        if self._drive is None or self._clip is None:
            raise RuntimeError("PreviewEngine.prepare() and listen() must run before render_chunk()")
        track, drive = self._clip.track, self._drive
        out = frames.copy()
        for k, (s, i) in enumerate(zip(source_index - self._clip.start, output_index, strict=True)):
            if track.found[s]:
                render_frame(frames[k], track.landmarks[s], drive.openness[i], drive.width[i], out=out[k])
        return out

"""The weight-free preview engine: a landmark-driven mouth re-animation that runs in real time on a CPU.

Per output frame the new audio gives mouth parameters (openness from loudness, smoothed a little because a
mouth cannot follow loudness from frame to frame; width from spectral shape), the opening scaled to the
person's own reach and moved toward their pace (how fast their mouth changes in the clip: PACE_WEIGHT); the
tracked 68 points of the source frame are first moved to a CLOSED mouth (removing the old speech, the D-Net
idea), then opened to the new parameters, the jaw line following a smoother opening than the lips (the jaw is
slower); a piecewise-affine warp of the lower face follows the points and is feather-blended into the frame.
The mouth itself is the person's own: the exemplar that :mod:`retalk.engines.mouths` chose for the output
frame, warped onto the new lip points, colour-matched to the skin around them and feather-blended; a cut
between exemplars fades in over CUT_FADE frames. Where the clip never opens its mouth as wide as the target,
the inner mouth is shaded dark with a hint of upper teeth instead (the synthesis the engine used before it
had exemplars). Pixels whose warp triangles do not move are copied unchanged, so everything away from the
lower face is bit-identical to the source; a frame's pixels depend only on its source frame, the clip's mouth
index and the audio plan, never on which frames were rendered before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
from scipy.spatial import Delaunay

from retalk.engines import SourceClip, options_ignored_by
from retalk.engines.mouths import (
    CACHE_KIND,
    DEFAULT_MOTION,
    INNER_LIP,
    INNER_LOWER,
    INNER_UPPER,
    JAW,
    LIPS,
    NOSE_BASE,
    OUTER_LIP,
    Mouth,
    MouthIndex,
    choose_mouths,
    face_axes,
    inner_lip_gap,
    mouth_index,
    mouth_shapes,
    patch_transform,
)

MAX_OPEN = 0.30  # largest inner-lip gap, in eye distances (about 18 mm for a 62 mm eye distance)
# The engine opens the mouth for the loudest sound as wide as the person does (MouthIndex.reach), at least this:
MIN_REACH = 0.15
MIN_GAP = 0.01  # inner-lip gap of a closed mouth, in eye distances
MAX_WIDEN = 0.10  # largest change of mouth width, as a fraction of the mouth width
WIDTH_SMOOTHING = 0.06  # seconds: the standard deviation of the width's smoothing
# A mouth follows loudness only so fast: the openness is smoothed over OPENING_SMOOTHING (a standard
# deviation) either side, and the jaw line, heavier than the lips, follows it smoothed over JAW_SMOOTHING more
# (keeping about a third of the lips' swing at four syllables a second). Each takes a few per cent off the
# frame-to-frame change of the mouth box at about the same lip sync: a jaw moving as fast as the lips made the
# chin the largest source of change above the person's own.
OPENING_SMOOTHING, JAW_SMOOTHING = 0.03, 0.06  # seconds
RING_SCALE = 1.7  # fixed anchor ring: jaw points pushed out from the mouth centre by this factor
MOUTH_RING = (1.3, 0.3)  # the exemplar's warp is anchored on the lips pushed out by this factor plus this
# many eye distances; inside it, the blend covers the lips grown by MOUTH_MARGIN, feathered by MOUTH_FEATHER
MOUTH_MARGIN, MOUTH_FEATHER = 0.08, 0.04  # eye distances
# How far an exemplar's inner mouth may be stretched open: up to STRETCH times its own opening plus SLACK
# eye distances; beyond that the synthesised cavity fades in over RAMP more.
STRETCH, SLACK, RAMP = 1.3, 0.02, 0.03
# A cut between exemplars is shown in even steps rather than one jump: in the frames right after it, the new
# mouth is laid at these opacities over the old one.
CUT_FADE = (1 / 3, 2 / 3)
# How far the opening's speed moves toward the person's own (as a power of the ratio of the two): all the way
# (1) leaves loud vowels at about two thirds of their own opening, which reads as mumbling. The smoothed
# openness changes more slowly than raw loudness, so a given weight scales it down less: 0.75 keeps loud
# vowels at about three quarters of the person's wide openings (where halfway did with the raw loudness) at a
# frame-to-frame change no more than their own
PACE_WEIGHT = 0.75


@dataclass(frozen=True)
class MouthDrive:
    """Mouth parameters per output frame, from the audio."""

    openness: np.ndarray  # (n,) in [0, 1]
    width: np.ndarray  # (n,) in [-1, 1]: negative = rounded/narrow, positive = spread
    jaw: np.ndarray  # (n,) the openness the jaw line follows: the openness, smoothed more

    def scaled(self, factor: float) -> MouthDrive:
        """The same drive with its openings (lips and jaw) scaled by ``factor``."""
        return MouthDrive(self.openness * factor, self.width, self.jaw * factor)


def _gaussian_smoothing(x: np.ndarray, sigma: float) -> np.ndarray:
    """``x`` convolved with a Gaussian of ``sigma`` samples, the ends held (scipy.ndimage would cost a third
    of a second to import, on the path of every preview)."""
    radius = int(np.ceil(4 * sigma))
    if not len(x) or radius == 0:
        return x
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return np.convolve(np.pad(x, radius, mode="edge"), kernel / kernel.sum(), mode="valid")


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
        return MouthDrive(np.zeros(n_frames), np.zeros(n_frames), np.zeros(n_frames))
    gate = 0.08 * loud  # below this the mouth is closed (breath, room noise)
    # linear in the RMS: a compressive map opens the mouth as wide for half-loud sounds and blurs the syllables
    openness = np.clip((rms - gate) / (loud - gate), 0, 1)
    voiced = openness > 0.1
    log_c = np.log(np.maximum(centroid, 1.0))
    if voiced.sum() >= 2:
        centre = np.median(log_c[voiced])
        spread = max(np.percentile(np.abs(log_c[voiced] - centre), 80), 1e-3)
        width = np.clip((log_c - centre) / spread, -1, 1) * np.minimum(openness * 3, 1)
    else:
        width = np.zeros(n_frames)
    dt = float(1 / rate)
    # lips round and spread over a syllable, not from frame to frame: the width (a noisy spectral feature)
    # is smoothed over WIDTH_SMOOTHING either side, symmetrically (the whole line is known: no lag); so are
    # the openings, less: loudness changes faster than a mouth can, and the jaw slower than the lips
    width = _gaussian_smoothing(width, WIDTH_SMOOTHING / dt)
    openness = _gaussian_smoothing(openness, OPENING_SMOOTHING / dt)
    jaw = _gaussian_smoothing(openness, JAW_SMOOTHING / dt)
    return MouthDrive(openness, np.clip(width, -1, 1), jaw)


def pose_mouth(
    lm: np.ndarray,
    openness: float,
    width: float,
    motion: np.ndarray = DEFAULT_MOTION,
    jaw: float | None = None,
) -> np.ndarray:
    """The 68 points with the original mouth closed, then opened to ``openness`` and widened by ``width``;
    each point moves down the face by ``motion`` (see :func:`retalk.engines.mouths.opening_motion`) times the
    change of opening, the jaw line's by that of the opening ``jaw`` where given (else ``openness``)."""
    ux, uy, eye_distance = face_axes(lm)
    out = lm.astype(np.float64).copy()
    opening = openness * MAX_OPEN * eye_distance
    shift = np.full(68, opening - inner_lip_gap(lm))  # close what was open, then open to the new gap
    if jaw is not None:
        shift[JAW] = jaw * MAX_OPEN * eye_distance - inner_lip_gap(lm)
    out += np.outer(motion * shift, uy)
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
    roi: np.ndarray,
    inner: np.ndarray,
    lips: np.ndarray,
    gap: float,
    eye_distance: float,
    strength: float = 1.0,
) -> None:
    """Darken the open mouth (polygon ``inner`` in ROI pixels) with a soft edge and a band of upper teeth;
    the colours follow the lips (points ``lips``) so the shading matches the shot's light. A closed mouth
    still gets its dark lip line. ``strength`` < 1 lays the shading only partly over what is there."""
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
    alpha = cv2.GaussianBlur(mask, (0, 0), sigma).astype(np.float32)[..., None] * np.float32(strength / 255)
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


def _paste_mouth(
    roi: np.ndarray,
    origin: np.ndarray,
    lm: np.ndarray,
    posed: np.ndarray,
    mouth: Mouth,
    eye_distance: float,
    opacity: float = 1.0,
) -> None:
    """The exemplar ``mouth`` warped so that its lip points land on the posed ones, colour-matched to the skin
    around the lips and feather-blended into ``roi`` (whose pixel (0, 0) is frame pixel ``origin``). The
    exemplar is first placed by the current face's own alignment (``lm``), so only the lips need warping."""
    frame_to_patch = patch_transform(lm)
    patch_to_frame = cv2.invertAffineTransform(frame_to_patch)
    lips = posed[LIPS] - origin
    exemplar_lips = mouth.lips @ patch_to_frame[:, :2].T + patch_to_frame[:, 2] - origin
    centre = lips[: len(OUTER_LIP)].mean(0)
    out = lips[: len(OUTER_LIP)] - centre
    push, extra = MOUTH_RING
    ring = centre + push * out + extra * eye_distance * out / np.maximum(np.hypot(*out.T), 1e-6)[:, None]
    x0, y0 = np.maximum(np.floor(ring.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(ring.max(0)).astype(int) + 1, roi.shape[1::-1])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return
    # where each pixel of the box samples the exemplar: frame position (warp), then patch position
    dx, dy = _displacement(np.r_[lips, ring], np.r_[exemplar_lips, ring], (x0, y0, x1, y1))
    at_x = dx + np.arange(x0 + origin[0], x1 + origin[0], dtype=np.float32)
    at_y = dy + np.arange(y0 + origin[1], y1 + origin[1], dtype=np.float32)[:, None]
    (a, b, c), (d, e, f) = frame_to_patch.astype(np.float32)
    sample = cv2.remap(
        mouth.patch,
        a * at_x + b * at_y + c,
        d * at_x + e * at_y + f,
        cv2.INTER_LINEAR,
        None,
        cv2.BORDER_REPLICATE,
    ).astype(np.float32)
    # blend mask: the outer lips grown by MOUTH_MARGIN, feathered; the skin part of it sets the colour
    inside = np.zeros(sample.shape[:2], np.uint8)
    contour = np.round((lips[: len(OUTER_LIP)] - [x0, y0]) * 16).astype(np.int32)
    cv2.fillPoly(inside, [contour], 255, cv2.LINE_AA, 4)
    grown = inside.copy()
    cv2.polylines(
        grown, [contour], True, 255, 2 * max(round(MOUTH_MARGIN * eye_distance), 1) + 1, cv2.LINE_AA, 4
    )
    alpha = cv2.GaussianBlur(grown, (0, 0), max(MOUTH_FEATHER * eye_distance, 0.8)).astype(np.float32)
    alpha *= np.float32(opacity / 255)
    target = roi[y0:y1, x0:x1]
    skin = (alpha > 0.05) & (inside == 0)
    if skin.any():
        gain = target[skin].mean(0) / np.maximum(sample[skin].mean(0), 1.0)
        sample *= np.clip(gain, 0.75, 1.33).astype(np.float32)
    mixed = target + alpha[..., None] * (sample - target)
    np.copyto(target, np.clip(np.rint(mixed), 0, 255).astype(np.uint8), where=(alpha > 0)[..., None])


def render_frame(
    frame: np.ndarray,
    lm: np.ndarray,
    openness: float,
    width: float,
    out: np.ndarray | None = None,
    mouth: Mouth | None = None,
    synthesis: float = 0.0,
    motion: np.ndarray = DEFAULT_MOTION,
    previous: Mouth | None = None,
    opacity: float = 1.0,
    jaw: float | None = None,
) -> np.ndarray:
    """One frame re-animated into ``out`` (a new array by default; it may be ``frame`` itself) with the
    exemplar ``mouth``, its inner mouth shaded over by the synthesised cavity with weight ``synthesis``, the
    face moving with the opening (the jaw line with ``jaw``) as ``motion`` says (:func:`pose_mouth`), laid
    at ``opacity`` over the exemplar ``previous`` where that is given (the frames right after a cut);
    without an exemplar, the old mouth is erased and the cavity synthesised in full. Pixels the warp and the
    mouth do not touch are the source's, bit for bit."""
    out = frame.copy() if out is None else out
    height, width_px = frame.shape[:2]
    moving, ring = _control_points(lm)
    posed = pose_mouth(lm, openness, width, motion, jaw)
    src = np.r_[lm[moving], ring]
    dst = np.r_[posed[moving], ring]
    x0, y0 = np.floor(np.minimum(src.min(0), dst.min(0))).astype(int)
    x1, y1 = np.ceil(np.maximum(src.max(0), dst.max(0))).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width_px), min(y1, height)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return out
    _, _, eye_distance = face_axes(lm)
    origin = np.array([x0, y0])
    roi = out[y0:y1, x0:x1]
    dx, dy = _displacement(dst, src, (x0, y0, x1, y1))
    active = dx * dx + dy * dy > 1e-6
    if active.any():
        map_x = dx + np.arange(x0, x1, dtype=np.float32)
        map_y = dy + np.arange(y0, y1, dtype=np.float32)[:, None]
        warped = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if mouth is None:
            _erase_old_mouth(
                warped,
                lm[INNER_LIP] - origin,
                posed[INNER_LIP] - origin,
                map_x - np.float32(x0),
                map_y - np.float32(y0),
                eye_distance,
            )
        # feather: full effect where the face moves, fading to the source towards the fixed ring
        sigma = max(0.03 * eye_distance, 1.0)
        alpha = cv2.GaussianBlur(active.astype(np.float32), (0, 0), sigma)[..., None]
        source = frame[y0:y1, x0:x1]
        mixed = np.clip(np.rint(source + alpha * (warped.astype(np.float32) - source)), 0, 255)
        np.copyto(roi, mixed.astype(np.uint8), where=active[..., None])
    if previous is not None:
        _paste_mouth(roi, origin, lm, posed, previous, eye_distance)
    if mouth is not None:
        _paste_mouth(roi, origin, lm, posed, mouth, eye_distance, opacity)
    if mouth is None or synthesis > 0:
        _shade_mouth(
            roi,
            posed[INNER_LIP] - origin,
            posed[OUTER_LIP] - origin,
            inner_lip_gap(posed),
            eye_distance,
            1.0 if mouth is None else synthesis,
        )
    return out


@dataclass(frozen=True)
class MouthPlan:
    """What the engine shows in each output frame, decided once for the whole output in ``listen``."""

    drive: MouthDrive  # the mouth parameters, opening scaled to the person's own reach and pace
    targets: np.ndarray  # (n, 3) the mouth_shapes the exemplars are chosen for: the drive's at the full reach
    exemplar: np.ndarray  # (n,) row of the clip's MouthIndex shown
    synthesis: np.ndarray  # (n,) weight of the synthesised cavity over the exemplar's inner mouth, 0..1


class PreviewEngine:
    """The preview renderer behind the engine contract (:class:`retalk.engines.Engine`)."""

    name = "preview"
    ignores = options_ignored_by("preview", "precision")  # no networks: nothing to compute in 16 bits
    fast_encode = True  # a preview is looked at once, and its encoding is a third of its time

    def __init__(self) -> None:
        self.clip: SourceClip | None = None
        self.index: MouthIndex | None = None
        self.plan: MouthPlan | None = None

    def prepare(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> list[str]:
        """The clip's mouth index (video only: from the cache when these frames were indexed before)."""
        self.clip = clip
        self.index, hit = mouth_index(clip, report)
        return [CACHE_KIND] if hit else []

    def listen(self, wav16k: np.ndarray, rate: Fraction, n_frames: int) -> list[str]:
        """The plan of every output frame (mouth parameters from the audio, the exemplar shown, how far its
        inner mouth is synthesised); returns a warning saying how often that synthesis was needed."""
        if self.index is None:
            raise RuntimeError("PreviewEngine.prepare() must run before listen()")
        index = self.index
        drive = mouth_drive(wav16k, rate, n_frames)
        # the person's own range: a clip that never opens wide gets at least MIN_REACH (and synthesis)
        reach = np.clip(index.reach, MIN_REACH, MAX_OPEN)
        full = drive.scaled(reach / MAX_OPEN)
        # and toward their own pace: loudness changes faster than a mouth does, so the opening is scaled down
        # toward the person's mean frame-to-frame change in the clip (PACE_WEIGHT). The exemplars are still
        # chosen at the full reach: a loud vowel shows the person's widest mouths (teeth and all), posed a
        # little less open.
        speed = np.abs(np.diff(full.openness)).mean() * MAX_OPEN if n_frames > 1 else 0.0
        pace = min(index.pace / speed, 1.0) ** PACE_WEIGHT if index.pace > 0 and speed > 0 else 1.0
        drive = full.scaled(pace)
        if len(index) == 0:  # no frame has a face: nothing will be rendered, and there is no face to pose
            self.plan = MouthPlan(drive, np.zeros((n_frames, 3)), np.full(n_frames, -1), np.zeros(n_frames))
            return []
        targets, posed = (
            np.array(
                [
                    mouth_shapes(pose_mouth(index.rest, o, w, index.motion))
                    for o, w in zip(d.openness, d.width, strict=True)
                ]
            ).reshape(-1, 3)
            for d in (full, drive)
        )
        exemplar = choose_mouths(index, targets)
        stretched = index.shapes[exemplar, 0] * STRETCH + SLACK
        synthesis = np.clip((posed[:, 0] - stretched) / RAMP, 0, 1)
        self.plan = MouthPlan(drive, targets, exemplar, synthesis)
        synthesised = int(np.count_nonzero(synthesis))
        if not synthesised:
            return []
        return [
            f"exemplar mouths: the clip's own mouth never opens as wide as {synthesised} of {n_frames} output "
            f"frames ({synthesised / n_frames:.0%}) need; their inner mouth is partly synthesised"
        ]

    def _fading_from(self, i: int) -> tuple[Mouth | None, float]:
        """Where output frame ``i`` is one of the first len(CUT_FADE) frames after a cut in the plan, the
        exemplar cut from and the new mouth's opacity over it; else (None, 1.0)."""
        exemplar, frames = self.plan.exemplar, self.index.frames
        for back, opacity in enumerate(CUT_FADE):
            j = i - back
            if j < 1:
                break
            if frames[exemplar[j]] - frames[exemplar[j - 1]] not in (0, 1):  # neither a hold nor forward play
                return self.index.mouth(exemplar[j - 1]), opacity
        return None, 1.0

    def render_chunk(
        self, frames: np.ndarray, source_index: np.ndarray, output_index: np.ndarray
    ) -> np.ndarray:
        """Clip frames ``source_index`` re-animated as output frames ``output_index``; faceless ones unchanged.
        Each frame is rendered from its own source frame and plan entry alone."""
        if self.plan is None or self.clip is None or self.index is None:
            raise RuntimeError("PreviewEngine.prepare() and listen() must run before render_chunk()")
        track, plan = self.clip.track, self.plan
        out = frames.copy()
        for k, (s, i) in enumerate(zip(source_index - self.clip.start, output_index, strict=True)):
            if track.found[s]:
                previous, opacity = self._fading_from(i)
                render_frame(
                    frames[k],
                    track.landmarks[s],
                    plan.drive.openness[i],
                    plan.drive.width[i],
                    out=out[k],
                    mouth=self.index.mouth(plan.exemplar[i]),
                    synthesis=plan.synthesis[i],
                    motion=self.index.motion,
                    previous=previous,
                    opacity=opacity,
                    jaw=plan.drive.jaw[i],
                )
        return out

"""The stages of the neural engine as batched functions over a chunk of frames (PIPELINE.md §2-§11).

Images are uint8 RGB (n, H, W, 3) unless a name says otherwise; E-Net alone works in BGR, as it was trained.
Faces are located by the clip's face track (dlib 68 points per frame): no stage runs a face detector.
Conversions to uint8 truncate where the reference truncates (D20) so values stay comparable with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retalk.align import (
    FACE_TEMPLATE_FFHQ_512,
    FACE_TEMPLATE_GPEN_512,
    LM3D_STD,
    align_img,
    crop_box,
    five_points,
    quad_from_landmarks,
    similarity_transform,
)
from retalk.blend import laplacian_pyramid_blend
from retalk.coeffs import dnet_driving_window
from retalk.device import batch_size
from retalk.models.enet import LNET_SIZE, PAD
from retalk.models.ganimation import compose_expression
from retalk.models.parsing import FACE_LABELS, MOUTH_LABELS, face_region_mask

CROP_SIZE = 256  # Stage 0 crops, face3d and D-Net input
FACE_SIZE = 384  # E-Net crops
ALIGNED_SIZE = 512  # GPEN, GFPGAN and ParseNet input
GANIMATION_SIZE = 128
CHIN_PAD = 20  # --pads default: pixels added below the face box (§9.4)
GFPGAN_BORDER = (132, 133, 135)  # facexlib's border colour (135, 133, 132) BGR, in RGB
MOUTH_LEVELS = 10  # Laplacian levels of the mouth blend (§11.4)
FACE_LEVELS = 6  # Laplacian levels of the final face-parse blend (§11.6)
REGION_MARGIN = 0.25  # work region around the paste box, as a fraction of its longer side
GPEN_SMALL_FACE = 100  # faces smaller than this get the 3x3 blur before warping back (§8 step 5)
# activation memory of one item in each network's forward pass, MB (CPU, fp32, measured at batch 4):
# the batch sizes follow from it (retalk.device.batch_size)
ITEM_MB = {
    "face3d": 30,
    "dnet": 125,
    "gpen": 460,
    "enet": 340,
    "ganimation": 30,
    "gfpgan": 525,
    "parsenet": 540,
}


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1]."""
    return (
        torch.tensor(images, device=device).permute(0, 3, 1, 2).float() / 255
    )  # a copy: inputs may be read-only


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) float in [0, 1] -> (n, H, W, 3) uint8, truncated as the reference does."""
    return (images.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _in_batches(
    forward: Callable[[slice], torch.Tensor], n: int, network: str, device: torch.device
) -> torch.Tensor:
    """``forward(items)`` over items [0, n) in slices as large as ``network``'s memory allows, concatenated
    (in fp32: autocast may return 16-bit halves)."""
    size = batch_size(device, ITEM_MB[network])
    return torch.cat([forward(slice(i, i + size)).float() for i in range(0, n, size)])


def per_frame_noise(
    seeds: Sequence[int], shapes: Sequence[tuple[int, int]], device: torch.device
) -> list[torch.Tensor]:
    """One (n, 1, H, W) standard-normal tensor per noise layer; frame k's noise depends on ``seeds[k]`` only,
    so a frame renders the same whatever its batch mates are (the reference draws fresh noise: D13)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in shapes]
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        for layer, (h, w) in zip(per_layer, shapes, strict=True):
            layer.append(torch.randn((1, 1, h, w), generator=generator))
    return [torch.cat(layer).to(device) for layer in per_layer]


# --- 0. crops ------------------------------------------------------------------------------------------------


def head_box(lm68: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Stage 0's FFHQ head box (x1, y1, x2, y2) for one frame's landmarks (per frame: the track is smoothed)."""
    return crop_box(quad_from_landmarks(lm68), width, height)


def paste_box(face_box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The E-Net crop: the tracked face box with the 20 px chin pad, clamped to the frame, truncated (§9.4)."""
    x1, y1, x2, y2 = face_box
    x1, y1 = int(max(x1, 0)), int(max(y1, 0))
    x2, y2 = int(min(x2, width)), int(min(y2 + CHIN_PAD, height))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def crop_resized(frame: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)


def landmarks_in_box(lm68: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Frame landmarks mapped into the ``size`` x ``size`` resized crop of ``box``."""
    x1, y1, x2, y2 = box
    return (lm68 - [x1, y1]) * [size / (x2 - x1), size / (y2 - y1)]


# --- 1. 3DMM coefficients (§4) -------------------------------------------------------------------------------


def face3d_rows(
    face3d: nn.Module, crops256: np.ndarray, lm256: np.ndarray, device: torch.device
) -> np.ndarray:
    """(n, 262) rows of coefficients (257) + align_img's trans_params (5) for 256 crops and their landmarks."""
    aligned, params = [], []
    for crop, lm in zip(crops256, lm256, strict=True):
        lm_yup = lm.copy()
        lm_yup[:, 1] = CROP_SIZE - 1 - lm_yup[:, 1]
        trans_params, im224, _, _ = align_img(crop, lm_yup, LM3D_STD)
        aligned.append(im224)
        params.append(trans_params)
    images = _to_tensor(np.stack(aligned), device)
    coeffs = _in_batches(
        lambda s: face3d(images[s]), len(images), "face3d", device
    )  # [n, 3, 224, 224] -> [n, 257]
    return np.concatenate([coeffs.cpu().numpy(), np.stack(params)], axis=1).astype(np.float32)


def expression_from_image(
    face3d: nn.Module, image: np.ndarray, lm68: np.ndarray, device: torch.device
) -> np.ndarray:
    """The 64 expression coefficients of a face in a whole image (the reference's ``--exp_img``, §5)."""
    lm_yup = lm68.copy()
    lm_yup[:, 1] = image.shape[0] - 1 - lm_yup[:, 1]
    _, im224, _, _ = align_img(image, lm_yup, LM3D_STD)
    coeffs = face3d(_to_tensor(im224[None], device))
    return coeffs[0, 80:144].float().cpu().numpy()


# --- 2. D-Net expression stabilisation (§6) ------------------------------------------------------------------


def stabilize(
    dnet: nn.Module,
    crops256: np.ndarray,
    semantic: np.ndarray,
    indices: Sequence[int],
    expression: np.ndarray,
    device: torch.device,
) -> np.ndarray:
    """D-Net re-renders each crop with the template expression and its own pose: (n, 256, 256, 3) uint8 RGB."""
    source = _to_tensor(crops256, device) * 2 - 1  # [n, 3, 256, 256] in [-1, 1]
    driving = torch.from_numpy(np.stack([dnet_driving_window(semantic, int(i), expression) for i in indices]))
    driving = driving.to(device)
    fake = _in_batches(
        lambda s: dnet(source[s], driving[s])["fake_image"], len(source), "dnet", device
    )  # [n, 73, 26] -> [n, 3, 256, 256]
    return _to_uint8((fake.clamp(-1, 1) + 1) / 2)


# --- 3. GPEN reference enhancement (§8) ----------------------------------------------------------------------


def parse_faces(
    parsenet: nn.Module, faces512: np.ndarray, labels: Sequence[int], device: torch.device
) -> np.ndarray:
    """(n, 512, 512) uint8 masks, 255 where ParseNet's label is in ``labels``."""
    logits = _in_batches(
        lambda s: parsenet(_to_tensor(faces512[s], device) * 2 - 1)[0], len(faces512), "parsenet", device
    )
    return face_region_mask(logits, labels).cpu().numpy()


def enhance_references(
    gpen: nn.Module,
    parsenet: nn.Module,
    stabilized: np.ndarray,
    lm256: np.ndarray,
    box256: np.ndarray,
    device: torch.device,
) -> np.ndarray:
    """GPEN on each stabilised face aligned to its 512 template, composited back with the face-parse mask."""
    matrices = [similarity_transform(five_points(lm), FACE_TEMPLATE_GPEN_512) for lm in lm256]
    aligned = np.stack(
        [
            cv2.warpAffine(img, m, (ALIGNED_SIZE,) * 2, flags=cv2.INTER_LINEAR)
            for img, m in zip(stabilized, matrices, strict=True)
        ]
    )
    enhanced = _in_batches(
        lambda s: gpen(_to_tensor(aligned[s], device) * 2 - 1), len(aligned), "gpen", device
    )
    enhanced = _to_uint8(enhanced * 0.5 + 0.5)
    masks = parse_faces(parsenet, enhanced, FACE_LABELS, device).astype(np.float32) / 255
    out = np.empty_like(stabilized)
    size = (CROP_SIZE, CROP_SIZE)
    for k, (orig, face, mask_sharp, m) in enumerate(zip(stabilized, enhanced, masks, matrices, strict=True)):
        inverse = cv2.invertAffineTransform(m)
        soft = np.zeros_like(mask_sharp)
        soft[20:-20, 20:-20] = mask_sharp[20:-20, 20:-20]
        soft = cv2.GaussianBlur(cv2.GaussianBlur(soft, (101, 101), 11), (101, 101), 11)
        x1, y1, x2, y2 = box256[k]
        if min(x2 - x1, y2 - y1) < GPEN_SMALL_FACE:
            face = cv2.filter2D(face, -1, np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16)
        face_back = cv2.warpAffine(face, inverse, size, flags=cv2.INTER_LINEAR).astype(np.float32)
        soft_back = cv2.warpAffine(soft, inverse, size, flags=cv2.INTER_LINEAR)[:, :, None]
        sharp_back = cv2.GaussianBlur(cv2.warpAffine(mask_sharp, inverse, size), (0, 0), 1)[:, :, None]
        img = cv2.convertScaleAbs(orig * (1 - soft_back) + face_back * soft_back)
        out[k] = cv2.convertScaleAbs(orig * (1 - sharp_back) + img * sharp_back)
    return out


def reference_crop(
    frame: np.ndarray, lm68: np.ndarray, head: Sequence[int], enhanced256: np.ndarray, face_box: Sequence[int]
) -> np.ndarray:
    """The 384 E-Net reference: the frame with the enhanced face pasted inside its FFHQ quad (the STIT paste of
    §9.2, with the track's landmarks instead of a second FAN pass), cropped at the E-Net box."""
    x1, y1, x2, y2 = head
    ff = frame.copy()
    region = ff[y1:y2, x1:x2]
    face = cv2.resize(enhanced256, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    quad = (quad_from_landmarks(lm68) - [x1, y1]) * 16  # 4 fractional bits for an anti-aliased edge
    alpha = np.zeros(region.shape[:2], np.uint8)
    cv2.fillConvexPoly(alpha, np.round(quad).astype(np.int32), 255, cv2.LINE_AA, shift=4)
    a = alpha[:, :, None].astype(np.float32) / 255
    region[:] = (face * a + region * (1 - a)).astype(np.uint8)
    return crop_resized(ff, face_box, FACE_SIZE)


# --- 4. E-Net lip synthesis (§9.5, §10) ----------------------------------------------------------------------


def enet_noise_shapes() -> list[tuple[int, int]]:
    """E-Net's four StyleConv noise sizes: two at 2x and two at 4x the padded L-Net image."""
    side = LNET_SIZE + 2 * PAD
    return [(2 * side, 2 * side)] * 2 + [(4 * side, 4 * side)] * 2


def lip_sync(
    enet: nn.Module,
    mel: np.ndarray,
    faces: np.ndarray,
    references: np.ndarray,
    seeds: Sequence[int],
    device: torch.device,
) -> np.ndarray:
    """E-Net mouths for (n, 384, 384, 3) RGB crops with their references and (n, 80, 16) mel windows."""
    masked = faces.copy()
    masked[:, FACE_SIZE // 2 :] = 0  # the lower half the network fills in
    img_batch = _to_tensor(np.concatenate([masked, references], axis=3)[..., [2, 1, 0, 5, 4, 3]], device)
    mel_batch = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)).to(device)[:, None]
    noise = per_frame_noise(seeds, enet_noise_shapes(), device)
    pred = _in_batches(
        lambda s: enet(mel_batch[s], img_batch[s], img_batch[s, 3:], noise=[z[s] for z in noise])[0],
        len(img_batch),
        "enet",
        device,
    )  # [n, 6, 384, 384] -> [n, 3, 384, 384]
    return _to_uint8(pred)[..., ::-1].copy()  # BGR -> RGB


def edit_upper_face(
    ganimation: nn.Module, faces: np.ndarray, pred: np.ndarray, aus: torch.Tensor, device: torch.device
) -> np.ndarray:
    """GANimation's upper face above the synthesised lower half (the reference's ``--up_face`` with
    ``--without_rl1``, §11.5; fed RGB, not the reference's BGR: D19)."""
    source = F.interpolate(
        _to_tensor(faces, device) * 2 - 1, size=GANIMATION_SIZE, mode="bilinear", align_corners=False
    )
    aus = aus.to(device).expand(len(faces), -1)

    def edit(items: slice) -> torch.Tensor:
        color, mask, _ = ganimation(source[items], aus[items])
        return compose_expression(source[items], color, mask)

    edited = _in_batches(edit, len(source), "ganimation", device) / 2 + 0.5
    edited = _to_uint8(F.interpolate(edited, size=FACE_SIZE, mode="bilinear", align_corners=False))
    out = pred.copy()
    out[:, : FACE_SIZE // 2] = edited[:, : FACE_SIZE // 2]
    return out


# --- 5. post-processing on a region around the face (§11) ----------------------------------------------------


def work_region(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """The only part of the frame the post-processing touches: the paste box plus a margin."""
    x1, y1, x2, y2 = box
    margin = int(REGION_MARGIN * max(x2 - x1, y2 - y1))
    return max(x1 - margin, 0), max(y1 - margin, 0), min(x2 + margin, width), min(y2 + margin, height)


def _levels(wanted: int, region: np.ndarray) -> int:
    return max(1, min(wanted, int(np.log2(min(region.shape[:2]))) + 1))


def _shifted(matrix: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """An affine map followed by a translation by (-dx, -dy): frame coordinates -> region coordinates."""
    out = matrix.copy()
    out[:, 2] -= [dx, dy]
    return out


def paste_faces(frames: np.ndarray, boxes: Sequence[Sequence[int]], pred: np.ndarray) -> np.ndarray:
    """Frames with each E-Net face resized into its box (hard edge, §11.1)."""
    out = frames.copy()
    for frame, (x1, y1, x2, y2), face in zip(out, boxes, pred, strict=True):
        frame[y1:y2, x1:x2] = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    return out


def restore_faces(
    gfpgan: nn.Module, pasted: np.ndarray, lm68: np.ndarray, seeds: Sequence[int], device: torch.device
) -> tuple[np.ndarray, list[np.ndarray]]:
    """GFPGAN v1.3 on each face aligned to the FFHQ 512 template from the track's 5 points (§11.2):
    (n, 512, 512, 3) restored faces and each face's frame -> template affine map."""
    matrices = [
        cv2.estimateAffinePartial2D(
            five_points(lm).astype(np.float32), FACE_TEMPLATE_FFHQ_512, method=cv2.LMEDS
        )[0]
        for lm in lm68
    ]
    aligned = np.stack(
        [
            cv2.warpAffine(
                f, m, (ALIGNED_SIZE,) * 2, borderMode=cv2.BORDER_CONSTANT, borderValue=GFPGAN_BORDER
            )
            for f, m in zip(pasted, matrices, strict=True)
        ]
    )
    shapes = [tuple(getattr(gfpgan.noises, f"noise{i}").shape[-2:]) for i in range(gfpgan.decoder.num_layers)]
    noise = per_frame_noise(seeds, shapes, device)
    out = _in_batches(
        lambda s: gfpgan(_to_tensor(aligned[s], device) * 2 - 1, noise=[z[s] for z in noise]),
        len(aligned),
        "gfpgan",
        device,
    )
    restored = ((out.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return restored, matrices


def paste_back_restored(
    pasted_region: np.ndarray, restored: np.ndarray, matrix: np.ndarray, origin: tuple[int, int]
) -> np.ndarray:
    """facexlib's paste-back of a restored face into the work region (soft eroded square mask)."""
    h, w = pasted_region.shape[:2]
    inverse = _shifted(cv2.invertAffineTransform(matrix), *origin)
    face = cv2.warpAffine(restored, inverse, (w, h)).astype(np.float32)
    mask = cv2.warpAffine(np.ones((ALIGNED_SIZE,) * 2, np.float32), inverse, (w, h))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    face_area = ALIGNED_SIZE**2 / abs(np.linalg.det(matrix[:, :2]))  # the whole square's, even if R clips it
    edge = int(face_area**0.5) // 20
    centre = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8)) if edge > 0 else mask
    soft = cv2.GaussianBlur(centre, (2 * edge + 1, 2 * edge + 1), 0)[:, :, None]
    return (soft * face * mask[:, :, None] + (1 - soft) * pasted_region).astype(np.uint8)


def box_mouth_mask(
    parsenet: nn.Module, restored_regions: list[np.ndarray], local_boxes: list, device: torch.device
) -> list[np.ndarray]:
    """Binary {0, 1} mouth+lips masks (ParseNet labels 10-12 on the box resized to 512; §11.3, D24)."""
    crops = np.stack(
        [crop_resized(r, b, ALIGNED_SIZE) for r, b in zip(restored_regions, local_boxes, strict=True)]
    )
    masks512 = parse_faces(parsenet, crops, MOUTH_LABELS, device)
    out = []
    for region, (x1, y1, x2, y2), m in zip(restored_regions, local_boxes, masks512, strict=True):
        mask = np.zeros(region.shape[:2], np.float32)
        mask[y1:y2, x1:x2] = cv2.resize(m, (x2 - x1, y2 - y1)) == 255
        out.append(mask)
    return out


def blend_mouth(restored: np.ndarray, pasted: np.ndarray, mouth: np.ndarray) -> np.ndarray:
    """GFPGAN's result only inside the mouth mask, at the region's own resolution (§11.4 without D1)."""
    blended = laplacian_pyramid_blend(restored, pasted, mouth, _levels(MOUTH_LEVELS, restored))
    return np.clip(blended, 0, 255).astype(np.uint8)


def face_parse_blend(
    parsenet: nn.Module,
    mouth_blended: list[np.ndarray],
    frames: np.ndarray,
    lm68: np.ndarray,
    regions: list[tuple[int, int, int, int]],
    local_boxes: list,
    device: torch.device,
) -> list[np.ndarray]:
    """The final composite (§11.6): the synthesised face inside GPEN's face-parse region of the box, the
    original frame elsewhere; the region's border keeps the original exactly (feathered in).

    ParseNet's 512 crop is warped from the whole frame with the region's result written into it, as the
    reference crops the whole frame: real context around the face, whatever the face's position."""
    matrices = [similarity_transform(five_points(lm), FACE_TEMPLATE_GPEN_512) for lm in lm68]  # frame -> crop
    aligned = []
    for frame, region, (x1, y1, x2, y2), m in zip(frames, mouth_blended, regions, matrices, strict=True):
        whole = frame.copy()
        whole[y1:y2, x1:x2] = region
        aligned.append(cv2.warpAffine(whole, m, (ALIGNED_SIZE,) * 2))
    aligned = np.stack(aligned)
    parsed = parse_faces(parsenet, aligned, FACE_LABELS, device).astype(np.float32) / 255
    out = []
    for region, frame, face, mask512, m, (rx1, ry1, rx2, ry2), (x1, y1, x2, y2) in zip(
        mouth_blended, frames, aligned, parsed, matrices, regions, local_boxes, strict=True
    ):
        orig = frame[ry1:ry2, rx1:rx2].astype(np.float32)
        h, w = region.shape[:2]
        inverse = _shifted(cv2.invertAffineTransform(m), rx1, ry1)  # crop -> region
        full_img = cv2.warpAffine(face, inverse, (w, h))
        mask = cv2.GaussianBlur(cv2.warpAffine(mask512, inverse, (w, h)), (0, 0), 1)
        box_mask = np.zeros_like(mask)
        box_mask[y1 : y2 - 5, x1:x2] = 1  # rows y1..y2-6, columns x1..x2-1 as the reference
        blended = np.clip(
            laplacian_pyramid_blend(full_img, orig, mask * box_mask, _levels(FACE_LEVELS, orig)), 0, 255
        )
        blended = blended.astype(np.uint8).astype(np.float32)
        feather = _border_feather(h, w, min(y1, x1, h - y2, w - x2))
        out.append(np.rint(orig + (blended - orig) * feather).astype(np.uint8))
    return out


def _border_feather(h: int, w: int, margin: int) -> np.ndarray:
    """1 inside, falling linearly to 0 at the region's edge over ``margin // 2`` px: the blend's coarse
    pyramid levels never put a seam on the region's border."""
    ramp = max(margin // 2, 1)
    ys = np.minimum(np.arange(h), np.arange(h)[::-1])
    xs = np.minimum(np.arange(w), np.arange(w)[::-1])
    edge = np.minimum(ys[:, None], xs[None, :]).astype(np.float32)
    return np.clip(edge / ramp, 0, 1)[:, :, None]

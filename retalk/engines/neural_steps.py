"""The steps of the neural engine (each network call and the image work between them) as batched functions over
a chunk of frames; the pipeline's own stages are those of ``retalk.pipeline.redub``.

Images are uint8 RGB (n, H, W, 3) unless a name says otherwise; E-Net alone works in BGR, as it was trained.
Every step takes its geometry as arguments (from a ``retalk.engines.geometry.FaceGeometry``) and its noise as
tensors, so that the recorded reference geometry and noise can be replayed (docs/DESIGN.md, deviations 1 and 5).
Each step does the reference's arithmetic: the same warps and interpolation flags, float64 where it computes in
float64, truncation to uint8 where it truncates and rounding where it rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from retalk.align import (
    FACE_TEMPLATE_FFHQ_512,
    FACE_TEMPLATE_GPEN_512,
    LM3D_STD,
    STIT_CROP_CORNERS_256,
    align_img,
    calc_alignment_coefficients,
    facexlib_affine,
    gpen_warp_matrices,
)
from retalk.blend import laplacian_pyramid_blend
from retalk.checkpoints.catalogue import GFPGAN, get_spec
from retalk.coeffs import dnet_driving_window
from retalk.device import batch_size
from retalk.models.enet import LNET_SIZE, PAD
from retalk.models.ganimation import compose_expression
from retalk.models.parsing import FACE_LABELS, MOUTH_LABELS, face_region_mask

CROP_SIZE = 256  # head crops: face3d, D-Net and the reference enhancement
FACE_SIZE = 384  # E-Net crops
ALIGNED_SIZE = 512  # GPEN, GFPGAN and ParseNet input
GANIMATION_SIZE = 128
GFPGAN_BORDER = (132, 133, 135)  # facexlib's border colour (135, 133, 132) BGR, in RGB
MOUTH_LEVELS = 10  # Laplacian levels of the mouth blend
FACE_LEVELS = 6  # Laplacian levels of the final face-parse blend
PARSE_BORDER = (
    20  # GPEN zeroes this many pixels around its 512 parse mask (in place: the sharp mask loses them too)
)
GPEN_SMALL_FACE = 100  # GPEN blurs faces whose detector box is smaller than this before warping them back
GPEN_SMALL_FACE_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
REGION_MARGIN = 0.25  # the engine's work region: the E-Net box grown by this fraction of its longer side
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

Box = tuple[int, int, int, int]  # x1, y1, x2, y2


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1] (the same values as the reference's float64 /255)."""
    return (
        torch.tensor(images, device=device).permute(0, 3, 1, 2).float() / 255
    )  # a copy: inputs may be read-only


def image_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, C) -> (n, C, H, W) on ``device``, the same dtype (a copy: inputs may be read-only)."""
    return torch.tensor(images, device=device).permute(0, 3, 1, 2)


def tensor_images(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) on any device -> (n, H, W, C) array (contiguous, as OpenCV wants its images)."""
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())


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
    so a frame renders the same whatever its batch mates are (docs/DESIGN.md, deviation 5)."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in shapes]
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        for layer, (h, w) in zip(per_layer, shapes, strict=True):
            layer.append(torch.randn((1, 1, h, w), generator=generator))
    return [torch.cat(layer).to(device) for layer in per_layer]


def crop_resized(frame: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """``frame[y1:y2, x1:x2]`` resized to ``size`` x ``size`` (bilinear, as every crop of the reference)."""
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)


# --- 1. 3DMM coefficients ------------------------------------------------------------------------------------


def face3d_inputs(crops256: np.ndarray, lm256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """align_img's 224 crops (n, 224, 224, 3) and trans_params (n, 5) float32 for 256 crops and their
    landmarks (y flipped to y-up as the reference does, in the landmarks' own dtype)."""
    aligned, params = [], []
    for crop, lm in zip(crops256, lm256, strict=True):
        lm_yup = lm.copy()
        lm_yup[:, 1] = CROP_SIZE - 1 - lm_yup[:, 1]
        trans_params, im224, _, _ = align_img(crop, lm_yup, LM3D_STD)
        aligned.append(im224)
        params.append(trans_params)
    return np.stack(aligned), np.stack(params)


def face3d_coefficients(face3d: nn.Module, aligned224: np.ndarray, device: torch.device) -> np.ndarray:
    """(n, 257) face3d coefficients of align_img's 224 crops."""
    images = _to_tensor(aligned224, device)
    coeffs = _in_batches(
        lambda s: face3d(images[s]), len(images), "face3d", device
    )  # [n, 3, 224, 224] -> [n, 257]
    return coeffs.cpu().numpy()


def face3d_rows(
    face3d: nn.Module, crops256: np.ndarray, lm256: np.ndarray, device: torch.device
) -> np.ndarray:
    """(n, 262) rows of coefficients (257) + align_img's trans_params (5) for 256 crops and their landmarks."""
    aligned, params = face3d_inputs(crops256, lm256)
    return np.concatenate([face3d_coefficients(face3d, aligned, device), params], axis=1).astype(np.float32)


def expression_from_image(
    face3d: nn.Module, image: np.ndarray, lm68: np.ndarray, device: torch.device
) -> np.ndarray:
    """The 64 expression coefficients of a face in a whole image (the reference's ``--exp_img``)."""
    lm_yup = lm68.copy()
    lm_yup[:, 1] = image.shape[0] - 1 - lm_yup[:, 1]
    _, im224, _, _ = align_img(image, lm_yup, LM3D_STD)
    coeffs = face3d(_to_tensor(im224[None], device))
    return coeffs[0, 80:144].float().cpu().numpy()


# --- 2. D-Net expression stabilisation -----------------------------------------------------------------------


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


# --- 3. GPEN reference enhancement ---------------------------------------------------------------------------


def parse_faces(
    parsenet: nn.Module, faces512: np.ndarray, labels: Sequence[int], device: torch.device
) -> np.ndarray:
    """(n, 512, 512) uint8 masks, 255 where ParseNet's label is in ``labels``."""
    return parse_face_tensors(parsenet, image_tensor(faces512, device), labels, device).cpu().numpy()


def parse_face_tensors(
    parsenet: nn.Module, faces512: torch.Tensor, labels: Sequence[int], device: torch.device
) -> torch.Tensor:
    """:func:`parse_faces` of (n, 3, 512, 512) uint8 tensors on ``device``: (n, 512, 512) uint8 masks there. The
    input is scaled in float64 and then cast, as GPEN's FaceParse does (float32 arithmetic rounds half of the
    values differently)."""

    def forward(items: slice) -> torch.Tensor:
        return parsenet((faces512[items].double() / 255.0 * 2 - 1).float())[0]

    logits = _in_batches(forward, len(faces512), "parsenet", device)
    return face_region_mask(logits, labels)


def gpen_align(images: np.ndarray, points5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPEN's ``warp_and_crop_face``: each image aligned to the 512 template from its 5 points (flags 3, as
    GPEN warps), and the template -> image map of each."""
    aligned, inverses = [], []
    for image, points in zip(images, points5, strict=True):
        forward, inverse = gpen_warp_matrices(points, FACE_TEMPLATE_GPEN_512)
        aligned.append(cv2.warpAffine(image, forward, (ALIGNED_SIZE,) * 2, flags=cv2.INTER_AREA))
        inverses.append(inverse)
    return np.stack(aligned), np.stack(inverses)


def restore_gpen(gpen: nn.Module, aligned: np.ndarray, device: torch.device) -> np.ndarray:
    """GPEN-BFR-512 on aligned 512 faces: (n, 512, 512, 3) uint8 (truncated, as GPEN's tensor2img)."""
    out = _in_batches(lambda s: gpen(_to_tensor(aligned[s], device) * 2 - 1), len(aligned), "gpen", device)
    return _to_uint8(out * 0.5 + 0.5)


def _parse_mask_layers(mask512: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPEN's two masks from a 0/255 parse mask: the sharp one (float64, its border zeroed in place by GPEN's
    mask_postprocess) and the soft one (two 101 px Gaussian blurs of it, float32)."""
    sharp = mask512 / 255.0
    b = PARSE_BORDER
    sharp[:b, :] = 0
    sharp[-b:, :] = 0
    sharp[:, :b] = 0
    sharp[:, -b:] = 0
    soft = cv2.GaussianBlur(cv2.GaussianBlur(sharp, (101, 101), 11), (101, 101), 11).astype(np.float32)
    return sharp, soft


class WarpedBack(NamedTuple):
    face: np.ndarray  # the 512 face warped back, zero where the soft mask is not positive
    soft: np.ndarray  # (h, w, 1) float32 soft mask where positive, else 0
    sharp: np.ndarray  # (h, w, 1) float64 sharp mask, blurred with sigma 1


def warp_back(
    face512: np.ndarray, mask512: np.ndarray, inverse: np.ndarray, size: tuple[int, int]
) -> WarpedBack:
    """GPEN's FaceEnhancement.process after the networks, for one face: masks and face back into an image of
    ``size`` (w, h) through ``inverse`` (template -> image)."""
    sharp, soft = _parse_mask_layers(mask512)
    soft = cv2.warpAffine(soft, inverse, size, flags=cv2.INTER_AREA)
    sharp = cv2.warpAffine(sharp, inverse, size, flags=cv2.INTER_AREA)
    face = cv2.warpAffine(face512, inverse, size, flags=cv2.INTER_AREA)
    inside = soft > 0
    return WarpedBack(
        np.where(inside[:, :, None], face, 0),
        np.where(inside, soft, 0)[:, :, None],
        cv2.GaussianBlur(sharp, (0, 0), sigmaX=1, sigmaY=1)[:, :, None],
    )


def gpen_composite(
    images: np.ndarray,
    restored512: np.ndarray,
    masks512: np.ndarray,
    inverses: np.ndarray,
    face_boxes: np.ndarray,
) -> np.ndarray:
    """GPEN's faces composited back into their images: through the soft face-parse mask, then the sharp one
    (two rounding ``convertScaleAbs``, as FaceEnhancement.process without Poisson blending)."""
    out = np.empty_like(images)
    for k, (image, face, mask, inverse, (x1, y1, x2, y2)) in enumerate(
        zip(images, restored512, masks512, inverses, face_boxes, strict=True)
    ):
        if min(y2 - y1, x2 - x1) < GPEN_SMALL_FACE:
            face = cv2.filter2D(face, -1, GPEN_SMALL_FACE_KERNEL)
        back = warp_back(face, mask, inverse, image.shape[1::-1])
        composite = cv2.convertScaleAbs(image * (1 - back.soft) + back.face * back.soft)
        out[k] = cv2.convertScaleAbs(image * (1 - back.sharp) + composite * back.sharp)
    return out


def enhance_references(
    gpen: nn.Module,
    parsenet: nn.Module,
    stabilized: np.ndarray,
    points5: np.ndarray,
    face_boxes: np.ndarray,
    device: torch.device,
) -> np.ndarray:
    """GPEN on each stabilised 256 face aligned from its 5 points, composited back with the face-parse mask."""
    aligned, inverses = gpen_align(stabilized, points5)
    restored = restore_gpen(gpen, aligned, device)
    masks = parse_faces(parsenet, restored, FACE_LABELS, device)
    return gpen_composite(stabilized, restored, masks, inverses, face_boxes)


# --- 4. the E-Net reference: the enhanced face pasted back into its frame ------------------------------------


def stit_crop(image256: np.ndarray, quad: np.ndarray) -> Image.Image:
    """STIT's aligned crop of the FFHQ ``quad`` (4, 2) of a 256 image: crop with a 10 % border, then a PIL QUAD
    transform to 256 x 256 (the reference's crop_image without padding; a quad inside a 256 image never
    reaches its shrink step)."""
    img = Image.fromarray(image256)
    quad = np.array(quad, dtype=np.float64)
    qsize = np.hypot(*((quad[3] - quad[1]) / 2)) * 2
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1])))
    right, bottom = int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1])))
    crop = (
        max(left - border, 0),
        max(top - border, 0),
        min(right + border, img.width),
        min(bottom + border, img.height),
    )
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad -= crop[0:2]
    return img.transform(
        (CROP_SIZE, CROP_SIZE), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR
    )


def stit_paste(enhanced256: np.ndarray, background256: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """(256, 256, 4) uint8: the STIT crop of the enhanced face projected back onto ``background256`` through
    the inverse perspective of its quad, pasted with its own alpha (RGB + alpha, as the reference's
    paste_image; the alpha is dropped afterwards)."""
    coefficients = calc_alignment_coefficients(quad + 0.5, STIT_CROP_CORNERS_256)
    projected = (
        stit_crop(enhanced256, quad)
        .convert("RGBA")
        .transform(
            (CROP_SIZE, CROP_SIZE), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR
        )
    )
    pasted = Image.fromarray(background256).convert("RGBA")
    pasted.paste(projected, (0, 0), mask=projected)
    return np.asarray(pasted)


def reference_crops(
    frames: np.ndarray,
    crop_boxes: np.ndarray,
    enhanced256: np.ndarray,
    quads: np.ndarray,
    enet_boxes: np.ndarray,
) -> np.ndarray:
    """(n, 384, 384, 3) E-Net references: the STIT composite of the enhanced face over a 256 resize of its head
    box, resized back into the head box of the frame, cropped at the E-Net box."""
    out = np.empty((len(frames), FACE_SIZE, FACE_SIZE, 3), np.uint8)
    for k, (frame, (x1, y1, x2, y2), face, quad, box) in enumerate(
        zip(frames, crop_boxes, enhanced256, quads, enet_boxes, strict=True)
    ):
        background = cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE))
        composite = stit_paste(face, background, quad)[:, :, :3]
        # only the union of the two boxes is needed: the head box gets the composite, the E-Net box is cut out
        ux1, uy1 = min(x1, box[0]), min(y1, box[1])
        ux2, uy2 = max(x2, box[2]), max(y2, box[3])
        local = frame[uy1:uy2, ux1:ux2].copy()
        local[y1 - uy1 : y2 - uy1, x1 - ux1 : x2 - ux1] = cv2.resize(composite, (x2 - x1, y2 - y1))
        out[k] = crop_resized(local, (box[0] - ux1, box[1] - uy1, box[2] - ux1, box[3] - uy1), FACE_SIZE)
    return out


# --- 5. E-Net lip synthesis ----------------------------------------------------------------------------------


def enet_noise_shapes() -> list[tuple[int, int]]:
    """E-Net's four StyleConv noise sizes: two at 2x and two at 4x the padded L-Net image."""
    side = LNET_SIZE + 2 * PAD
    return [(2 * side, 2 * side)] * 2 + [(4 * side, 4 * side)] * 2


ENET_CHANNELS = [2, 1, 0, 5, 4, 3]  # the RGB face and the RGB reference, each in E-Net's BGR order


def enet_inputs(faces: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(n, 384, 384, 6) uint8 BGR: each face with its lower half blacked out, then its reference."""
    masked = faces.copy()
    masked[:, FACE_SIZE // 2 :] = 0  # the lower half the network fills in
    return np.concatenate([masked, references], axis=3)[..., ENET_CHANNELS]


def lip_sync(
    enet: nn.Module,
    mel: np.ndarray,
    faces: np.ndarray,
    references: np.ndarray,
    noise: Sequence[torch.Tensor],
    device: torch.device,
) -> np.ndarray:
    """E-Net mouths (n, 384, 384, 3) RGB for RGB crops with their references, (n, 80, 16) mel windows and the
    four StyleConv noise maps (n, 1, H, W) (row k is frame k's)."""
    inputs = image_tensor(enet_inputs(faces, references), device)
    return tensor_images(lip_sync_tensors(enet, mel, inputs, noise, device))


def lip_sync_tensors(
    enet: nn.Module,
    mel: np.ndarray,
    inputs: torch.Tensor,
    noise: Sequence[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """:func:`lip_sync` of :func:`enet_inputs` as an (n, 6, 384, 384) uint8 tensor on ``device``: the mouths
    (n, 3, 384, 384) uint8 RGB there."""
    img_batch = inputs.float() / 255
    mel_batch = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)).to(device)[:, None]
    pred = _in_batches(
        lambda s: enet(mel_batch[s], img_batch[s], img_batch[s, 3:], noise=[z[s] for z in noise])[0],
        len(img_batch),
        "enet",
        device,
    )  # [n, 6, 384, 384] -> [n, 3, 384, 384]
    return (pred.clamp(0, 1) * 255).to(torch.uint8).flip(1)  # truncated as _to_uint8; BGR -> RGB


def edit_upper_face(
    ganimation: nn.Module, faces: np.ndarray, pred: np.ndarray, aus: torch.Tensor, device: torch.device
) -> np.ndarray:
    """GANimation's upper face above the synthesised lower half (the reference's ``--up_face`` with
    ``--without_rl1``; fed RGB, not the reference's BGR: docs/DESIGN.md, deviation 8)."""
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


# --- 6. post-processing: GFPGAN, the mouth blend and the face-parse paste ------------------------------------


class BlendArea(NamedTuple):
    """Where a face's post-processing happens: the frame rectangle ``box``, blended at ``size`` (w, h).

    The engine works on a region around the face at its own resolution (:func:`face_area`); the reference
    resizes the whole frame to 512 x 512 and back (:func:`whole_frame_512`; docs/DESIGN.md, deviation 6)."""

    box: Box
    size: tuple[int, int]

    def local(self, box: Sequence[int]) -> Box:
        """A frame box in this area's coordinates."""
        x1, y1, x2, y2 = box
        return x1 - self.box[0], y1 - self.box[1], x2 - self.box[0], y2 - self.box[1]


def face_area(box: Sequence[int], width: int, height: int) -> BlendArea:
    """The engine's area: the E-Net box plus a margin, blended at its own resolution."""
    x1, y1, x2, y2 = box
    margin = int(REGION_MARGIN * max(x2 - x1, y2 - y1))
    region = max(x1 - margin, 0), max(y1 - margin, 0), min(x2 + margin, width), min(y2 + margin, height)
    return BlendArea(region, (region[2] - region[0], region[3] - region[1]))


def whole_frame_512(width: int, height: int) -> BlendArea:
    """The reference's area: the whole frame, resized to 512 x 512 for the blends."""
    return BlendArea((0, 0, width, height), (ALIGNED_SIZE, ALIGNED_SIZE))


def _shifted(matrix: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """An affine map followed by a translation by (-dx, -dy): into an area whose top-left is (dx, dy)."""
    out = matrix.copy()
    out[:, 2] -= [dx, dy]
    return out


def cut(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return image[y1:y2, x1:x2]


def paste_faces(frames: np.ndarray, boxes: Sequence[Sequence[int]], pred: np.ndarray) -> np.ndarray:
    """Frames with each E-Net face resized into its box (hard edge)."""
    out = frames.copy()
    for frame, (x1, y1, x2, y2), face in zip(out, boxes, pred, strict=True):
        frame[y1:y2, x1:x2] = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    return out


def gfpgan_align(frames: np.ndarray, points5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """facexlib's 512 crops (FFHQ template, grey border) of whole frames, and each frame -> crop map."""
    matrices = np.stack([facexlib_affine(p, FACE_TEMPLATE_FFHQ_512) for p in points5])
    crops = np.stack(
        [
            cv2.warpAffine(
                f, m, (ALIGNED_SIZE,) * 2, borderMode=cv2.BORDER_CONSTANT, borderValue=GFPGAN_BORDER
            )
            for f, m in zip(frames, matrices, strict=True)
        ]
    )
    return crops, matrices


def gfpgan_noise_shapes() -> list[tuple[int, int]]:
    """GFPGAN's decoder noise sizes, one per StyleConv: those of its file's stored noise maps, read from the
    catalogue's layout (an OpenVINO-compiled GFPGAN has no buffers to ask)."""
    prefix = "stylegan_decoder.noises.noise"
    shapes = {
        int(name.removeprefix(prefix)): tuple(shape[-2:])
        for name, shape, _ in get_spec(GFPGAN).entries
        if name.startswith(prefix)
    }
    return [shapes[i] for i in range(len(shapes))]


def restore_gfpgan(
    gfpgan: nn.Module, crops: np.ndarray, noise: Sequence[torch.Tensor], device: torch.device
) -> np.ndarray:
    """GFPGAN v1.3 on 512 crops with per-layer noise maps (n, 1, h, w): (n, 512, 512, 3) uint8."""
    return tensor_images(restore_gfpgan_tensors(gfpgan, image_tensor(crops, device), noise, device))


def restore_gfpgan_tensors(
    gfpgan: nn.Module, crops: torch.Tensor, noise: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """:func:`restore_gfpgan` of (n, 3, 512, 512) uint8 tensors on ``device``, the same shape and place out,
    rounded as basicsr's tensor2img rounds."""
    out = _in_batches(
        lambda s: gfpgan(crops[s].float() / 255 * 2 - 1, noise=[z[s] for z in noise]),
        len(crops),
        "gfpgan",
        device,
    )
    return ((out.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)


def paste_back_region(matrix: np.ndarray, area: BlendArea, width: int, height: int) -> tuple[Box, np.ndarray]:
    """Where :func:`paste_back_restored` works in a ``width`` x ``height`` frame: the area's box together with
    the restored square's footprint, and the crop -> that region map."""
    inverse = cv2.invertAffineTransform(matrix)  # crop -> frame
    corners = np.array(
        [[0, 0, 1], [ALIGNED_SIZE, 0, 1], [0, ALIGNED_SIZE, 1], [ALIGNED_SIZE, ALIGNED_SIZE, 1]]
    )
    foot = corners @ inverse.T
    x1, y1, x2, y2 = area.box
    ux1, uy1 = max(min(x1, int(foot[:, 0].min()) - 2), 0), max(min(y1, int(foot[:, 1].min()) - 2), 0)
    ux2, uy2 = min(max(x2, int(foot[:, 0].max()) + 3), width), min(max(y2, int(foot[:, 1].max()) + 3), height)
    return (ux1, uy1, ux2, uy2), _shifted(inverse, ux1, uy1)


def paste_back_restored(
    frame: np.ndarray, restored: np.ndarray, matrix: np.ndarray, area: BlendArea
) -> np.ndarray:
    """facexlib's paste-back of a restored 512 face into ``frame`` (square mask, eroded and blurred by a
    width that follows the face's area), returned for the area's box.

    It runs over the box together with the square's footprint: the soft mask's width depends on the whole
    eroded square, as facexlib sums it over the whole frame."""
    (ux1, uy1, ux2, uy2), inverse = paste_back_region(matrix, area, frame.shape[1], frame.shape[0])
    size = (ux2 - ux1, uy2 - uy1)
    x1, y1, x2, y2 = area.box
    face = cv2.warpAffine(restored, inverse, size)
    mask = cv2.erode(
        cv2.warpAffine(np.ones((ALIGNED_SIZE,) * 2, np.float32), inverse, size), np.ones((2, 2), np.uint8)
    )
    edge = int(np.sum(mask) ** 0.5) // 20
    centre = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8)) if edge > 0 else mask
    soft = cv2.GaussianBlur(centre, (2 * edge + 1, 2 * edge + 1), 0)[:, :, None]
    pasted = (soft * (mask[:, :, None] * face) + (1 - soft) * frame[uy1:uy2, ux1:ux2]).astype(np.uint8)
    return pasted[y1 - uy1 : y2 - uy1, x1 - ux1 : x2 - ux1]


def mask_in_box(mask512: np.ndarray, box: Box, shape: tuple[int, ...]) -> np.ndarray:
    """A 0/255 512 mask resized into ``box`` of an (h, w) uint8 image, as {0, 1}: the reference writes mask / 255
    into a uint8 array, so only pixels that stay at 255 after the resize survive."""
    x1, y1, x2, y2 = box
    out = np.zeros(shape[:2], np.uint8)
    out[y1:y2, x1:x2] = (cv2.resize(mask512, (x2 - x1, y2 - y1)) / 255.0).astype(np.uint8)
    return out


def mouth_masks(
    parsenet: nn.Module, restored: list[np.ndarray], boxes: list[Box], device: torch.device
) -> list[np.ndarray]:
    """ParseNet's mouth and lips (labels 10-12) in each box of the restored images, as {0, 1} image masks."""
    crops = np.stack([crop_resized(r, b, ALIGNED_SIZE) for r, b in zip(restored, boxes, strict=True)])
    masks512 = parse_faces(parsenet, crops, MOUTH_LABELS, device)
    return [mask_in_box(m, b, r.shape) for r, b, m in zip(restored, boxes, masks512, strict=True)]


def pyramid_levels(wanted: int, size: tuple[int, int]) -> int:
    """Pyramid levels for an image of ``size``: ``wanted``, fewer where the image is too small for them."""
    return max(1, min(wanted, int(np.log2(min(size))) + 1))


def blend_in_area(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray, size: tuple[int, int], levels: int
) -> np.ndarray:
    """Laplacian blend of ``a`` (where ``mask`` is 1) over ``b`` at ``size`` (w, h), back at the images' size,
    clipped and truncated to uint8 as the reference's blends."""
    h, w = a.shape[:2]
    mask = mask.astype(np.float32)
    resized = (w, h) != tuple(size)
    if resized:
        a, b, mask = (cv2.resize(x, tuple(size)) for x in (a, b, mask))
    out = np.clip(laplacian_pyramid_blend(a, b, mask, pyramid_levels(levels, size)), 0, 255)
    return np.uint8(cv2.resize(out, (w, h)) if resized else out)


def face_parse_paste(
    aligned: np.ndarray,
    masks512: np.ndarray,
    inverses: np.ndarray,
    frames: np.ndarray,
    boxes: Sequence[Sequence[int]],
    areas: Sequence[BlendArea],
) -> list[np.ndarray]:
    """The final composite, per face, for its area: the aligned crop warped back inside GPEN's face-parse mask
    (blurred, limited to rows y1..y2-6 and columns x1..x2-1 of the E-Net box), the original frame elsewhere
    (a 6-level Laplacian blend). A region inside the frame is feathered into the original at its edges."""
    out = []
    for face, mask, inverse, frame, box, area in zip(
        aligned, masks512, inverses, frames, boxes, areas, strict=True
    ):
        x1, y1, x2, y2 = area.local(box)
        original = cut(frame, area.box)
        h, w = original.shape[:2]
        back = warp_back(face, mask, _shifted(inverse, *area.box[:2]), (w, h))
        box_mask = np.zeros_like(back.sharp)
        box_mask[y1 : y2 - 5, x1:x2] = 1
        blended = blend_in_area(back.face, original, (back.sharp * box_mask)[:, :, 0], area.size, FACE_LEVELS)
        out.append(_feathered(blended, original, area, frame.shape[1], frame.shape[0], (x1, y1, x2, y2)))
    return out


def _feathered(
    blended: np.ndarray, original: np.ndarray, area: BlendArea, width: int, height: int, box: Box
) -> np.ndarray:
    """``blended`` faded into ``original`` towards the area's edges that lie inside the frame, over half the
    margin between the box and that edge: the blend's coarse pyramid levels never leave a seam where the area
    ends. Edges on the frame's border stay as they are (the whole frame: no change at all)."""
    fade = feather_fade(area, width, height, box)
    if fade is None:
        return blended
    return np.rint(original + (blended.astype(np.float32) - original) * fade[:, :, None]).astype(np.uint8)


def feather_fade(area: BlendArea, width: int, height: int, box: Box) -> np.ndarray | None:
    """:func:`_feathered`'s weight of the blend, (h, w) float32 over the area, for a ``width`` x ``height``
    frame and the E-Net ``box`` in area coordinates; None where no edge of the area lies inside the frame."""
    ax1, ay1, ax2, ay2 = area.box
    w, h = ax2 - ax1, ay2 - ay1
    x1, y1, x2, y2 = box
    inner = [(ax1 > 0, x1), (ay1 > 0, y1), (ax2 < width, w - x2), (ay2 < height, h - y2)]
    margins = [m for inside, m in inner if inside]
    if not margins:
        return None
    ramp = max(min(margins) // 2, 1)
    far = np.float32(1e9)
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    to_edge = np.minimum(
        np.minimum(xs if ax1 > 0 else far, xs[::-1] if ax2 < width else far)[None, :],
        np.minimum(ys if ay1 > 0 else far, ys[::-1] if ay2 < height else far)[:, None],
    )
    return np.clip(to_edge / ramp, 0, 1)

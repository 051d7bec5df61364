"""The neural engine's per-frame render path with its image work in torch (retalk.engines.torch_image) on the
networks' device: the frames go there once, each network's output feeds the next step where it lies, and only
the rendered areas come back.

The steps mirror those of retalk.engines.neural_steps (which stay the parity path, the reference's arithmetic
in NumPy and OpenCV) on (n, C, H, W) tensors: uint8 images, float32 masks. They agree with them to a grey level
or so (tests/test_torch_image.py measures it); :func:`image_ops` says which path a device takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from retalk.align import FACE_TEMPLATE_FFHQ_512, FACE_TEMPLATE_GPEN_512, facexlib_affine, gpen_warp_matrices
from retalk.engines import neural_steps as steps
from retalk.engines import torch_image as ti
from retalk.engines.geometry import FaceGeometry
from retalk.errors import InputError

IMAGE_OPS = ("auto", "opencv", "torch")  # auto: torch on CUDA, the OpenCV parity path elsewhere
ALIGNED = (steps.ALIGNED_SIZE, steps.ALIGNED_SIZE)


def image_ops(device: torch.device, choice: str = "auto") -> str:
    """The render path's image operations on ``device``: "opencv" (NumPy/OpenCV on the CPU, the parity path) or
    "torch" (on the device); "auto" takes torch on CUDA only."""
    if choice not in IMAGE_OPS:
        raise InputError(f"image_ops {choice!r}: expected one of {', '.join(IMAGE_OPS)}")
    if choice == "auto":
        return "torch" if device.type == "cuda" else "opencv"
    return choice


def crop_resized(images: torch.Tensor, boxes: Sequence[Sequence[int]], size: int) -> torch.Tensor:
    """:func:`neural_steps.crop_resized` of each image at its box: (n, C, size, size)."""
    return torch.cat(
        [ti.resize(cut(image, box)[None], (size, size)) for image, box in zip(images, boxes, strict=True)]
    )


def cut(image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """A (C, H, W) image's box."""
    x1, y1, x2, y2 = box
    return image[:, y1:y2, x1:x2]


def paste_faces(frames: torch.Tensor, boxes: Sequence[Sequence[int]], pred: torch.Tensor) -> torch.Tensor:
    out = frames.clone()
    for frame, (x1, y1, x2, y2), face in zip(out, boxes, pred, strict=True):
        frame[:, y1:y2, x1:x2] = ti.resize(face[None], (x2 - x1, y2 - y1))[0]
    return out


def paste_back_restored(
    frame: torch.Tensor, restored: torch.Tensor, matrix: np.ndarray, area: steps.BlendArea
) -> torch.Tensor:
    """:func:`neural_steps.paste_back_restored` of a (3, H, W) frame and its (3, 512, 512) restored face."""
    (ux1, uy1, ux2, uy2), inverse = steps.paste_back_region(matrix, area, frame.shape[2], frame.shape[1])
    size = (ux2 - ux1, uy2 - uy1)
    face = ti.warp_affine(restored[None], inverse[None], size)
    ones = torch.ones((1, 1, *ALIGNED), dtype=torch.float32, device=frame.device)
    mask = ti.erode(ti.warp_affine(ones, inverse[None], size), (2, 2))
    edge = int(mask.double().sum().item() ** 0.5) // 20
    centre = ti.erode(mask, (2 * edge, 2 * edge)) if edge > 0 else mask
    soft = ti.gaussian_blur(centre, 2 * edge + 1, 0)
    pasted = (soft * (mask * face) + (1 - soft) * frame[None, :, uy1:uy2, ux1:ux2]).to(torch.uint8)
    x1, y1, x2, y2 = area.box
    return pasted[0, :, y1 - uy1 : y2 - uy1, x1 - ux1 : x2 - ux1]


def mouth_masks(
    parsenet: nn.Module, restored: list[torch.Tensor], boxes: list[steps.Box], device: torch.device
) -> list[torch.Tensor]:
    """:func:`neural_steps.mouth_masks`: (1, 1, h, w) float32 {0, 1} masks."""
    crops = torch.cat(
        [crop_resized(r[None], [b], steps.ALIGNED_SIZE) for r, b in zip(restored, boxes, strict=True)]
    )
    masks512 = steps.parse_face_tensors(parsenet, crops, steps.MOUTH_LABELS, device)
    out = []
    for image, (x1, y1, x2, y2), mask in zip(restored, boxes, masks512, strict=True):
        full = torch.zeros((1, 1, *image.shape[1:]), dtype=torch.float32, device=device)
        # the reference writes mask / 255 into uint8: only pixels still at 255 after the resize survive
        full[..., y1:y2, x1:x2] = ti.resize(mask[None, None], (x2 - x1, y2 - y1)) == 255
        out.append(full)
    return out


def blend_in_area(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, size: tuple[int, int], levels: int
) -> torch.Tensor:
    """:func:`neural_steps.blend_in_area` of (1, 3, h, w) uint8 images and a (1, 1, h, w) float mask."""
    h, w = a.shape[2:]
    resized = (w, h) != tuple(size)
    if resized:
        a, b, mask = (ti.resize(x, tuple(size)) for x in (a, b, mask))
    out = ti.laplacian_pyramid_blend(a, b, mask, steps.pyramid_levels(levels, size)).clamp(0, 255)
    return (ti.resize(out, (w, h)) if resized else out).to(torch.uint8)


def _parse_mask_layers(masks512: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`neural_steps._parse_mask_layers` of (n, 512, 512) uint8 masks: (n, 1, 512, 512) float32 each."""
    sharp = masks512[:, None].float() / 255
    b = steps.PARSE_BORDER
    sharp[..., :b, :] = 0
    sharp[..., -b:, :] = 0
    sharp[..., :b] = 0
    sharp[..., -b:] = 0
    return sharp, ti.gaussian_blur(ti.gaussian_blur(sharp, 101, 11), 101, 11)


def face_parse_paste(
    aligned: torch.Tensor,
    masks512: torch.Tensor,
    inverses: np.ndarray,
    frames: torch.Tensor,
    boxes: Sequence[Sequence[int]],
    areas: Sequence[steps.BlendArea],
) -> list[torch.Tensor]:
    """:func:`neural_steps.face_parse_paste`: the final (3, h, w) uint8 area of each face."""
    sharp512, soft512 = _parse_mask_layers(masks512)
    height, width = frames.shape[2:]
    out = []
    for k, (face, frame, box, area) in enumerate(zip(aligned, frames, boxes, areas, strict=True)):
        x1, y1, x2, y2 = area.local(box)
        ax1, ay1, ax2, ay2 = area.box
        original = frame[None, :, ay1:ay2, ax1:ax2]
        size = (ax2 - ax1, ay2 - ay1)
        inverse = steps._shifted(inverses[k], ax1, ay1)[None]
        soft = ti.warp_affine(soft512[k : k + 1], inverse, size)
        sharp = ti.gaussian_blur(ti.warp_affine(sharp512[k : k + 1], inverse, size), 0, 1)
        warped = torch.where(soft > 0, ti.warp_affine(face[None], inverse, size), 0)
        box_mask = torch.zeros_like(sharp)
        box_mask[..., y1 : y2 - 5, x1:x2] = 1
        blended = blend_in_area(warped, original, sharp * box_mask, area.size, steps.FACE_LEVELS)
        fade = steps.feather_fade(area, width, height, (x1, y1, x2, y2))
        if fade is not None:
            fade = torch.from_numpy(fade).to(frames.device)
            blended = torch.round(original + (blended.float() - original) * fade).to(torch.uint8)
        out.append(blended[0])
    return out


def render_faces(
    enet: nn.Module,
    gfpgan: nn.Module,
    parsenet: nn.Module,
    frames: np.ndarray,
    geometry: FaceGeometry,
    mel: np.ndarray,
    references: np.ndarray,
    enet_noise: Sequence[torch.Tensor],
    gfpgan_noise: Sequence[torch.Tensor],
    areas: Sequence[steps.BlendArea],
    device: torch.device,
    upper_face: tuple[nn.Module, torch.Tensor] | None = None,
    trace: Callable[[str, object], None] | None = None,
) -> np.ndarray:
    """retalk.engines.neural.render_faces with the image work on ``device``; ``trace`` (when given) sees the
    same arrays as the OpenCV path's."""
    boxes = geometry.enet_boxes
    on_device = steps.image_tensor(frames, device)
    # 1. E-Net
    faces = crop_resized(on_device, boxes, steps.FACE_SIZE)
    masked = faces.clone()
    masked[:, :, steps.FACE_SIZE // 2 :] = 0  # neural_steps.enet_inputs: the lower half, then BGR
    inputs = torch.cat([masked, steps.image_tensor(references, device)], 1)[:, steps.ENET_CHANNELS]
    pred = steps.lip_sync_tensors(enet, mel, inputs, enet_noise, device)
    # 2. optional upper-face expression (GANimation's step stays on arrays)
    if upper_face is not None:
        edited = steps.edit_upper_face(
            upper_face[0], steps.tensor_images(faces), steps.tensor_images(pred), upper_face[1], device
        )
        pred = steps.image_tensor(edited, device)
    if trace:
        trace("pred", steps.tensor_images(pred))
    # 3. paste, GFPGAN on the 5-point aligned face, pasted back
    pasted = paste_faces(on_device, boxes, pred)
    matrices = np.stack([facexlib_affine(p, FACE_TEMPLATE_FFHQ_512) for p in geometry.restore_points])
    crops = ti.warp_affine(pasted, matrices, ALIGNED, steps.GFPGAN_BORDER)
    restored = steps.restore_gfpgan_tensors(gfpgan, crops, gfpgan_noise, device)
    restored = [
        paste_back_restored(p, r, m, a) for p, r, m, a in zip(pasted, restored, matrices, areas, strict=True)
    ]
    if trace:
        trace("gfpgan_pasted", [steps.tensor_images(r[None])[0] for r in restored])
    # 4. the mouth of GFPGAN's face blended into the pasted face
    local_boxes = [a.local(b) for a, b in zip(areas, boxes, strict=True)]
    mouths = mouth_masks(parsenet, restored, local_boxes, device)
    # the blended areas go into the pasted frames: each area holds its E-Net box, so these are the original
    # frames with the areas written in (the OpenCV path's _with_area)
    for frame, r, m, a in zip(pasted, restored, mouths, areas, strict=True):
        region = cut(frame, a.box)
        region[:] = blend_in_area(r[None], region[None], m, a.size, steps.MOUTH_LEVELS)[0]
    if trace:
        trace("pp", [steps.tensor_images(cut(f, a.box)[None])[0] for f, a in zip(pasted, areas, strict=True)])
    # 5. the face-parse paste onto the original frame, from GPEN's crop of the whole mouth-blended frame
    forwards, inverses = zip(
        *(gpen_warp_matrices(p, FACE_TEMPLATE_GPEN_512) for p in geometry.paste_points), strict=True
    )
    aligned = ti.warp_affine(pasted, np.stack(forwards), ALIGNED)
    del pasted
    masks = steps.parse_face_tensors(parsenet, aligned, steps.FACE_LABELS, device)
    final = face_parse_paste(aligned, masks, np.stack(inverses), on_device, boxes, areas)
    out = frames.copy()
    for frame, area, face in zip(out, areas, final, strict=True):
        x1, y1, x2, y2 = area.box
        frame[y1:y2, x1:x2] = steps.tensor_images(face[None])[0]
    return out

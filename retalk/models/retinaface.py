"""GPEN's RetinaFace-ResNet50 detector with its anchors, decoding and NMS.

ResNet-50 (torchvision layout) taps layer2..4 -> FPN (256 channels, nearest up-sampling) -> an SSH context
module per level -> 1x1 heads with two anchors per cell: 2 class logits (soft-maxed in forward, as the
reference's test phase does), 4 box offsets and 10 landmark offsets. Post-processing (GPEN's cfg_re50):
anchors of min sizes (16, 32), (64, 128), (256, 512) at strides 8, 16, 32, variances (0.1, 0.2), scores > 0.9,
NMS at IoU 0.4, best first. Input: (B, 3, H, W) **BGR**, 0..255 minus (104, 117, 123).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from retalk.checkpoints.catalogue import RETINAFACE as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint
from retalk.models.s3fd import nms

BGR_MEANS = (104.0, 117.0, 123.0)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
CONFIDENCE_THRESHOLD = 0.9
NMS_IOU = 0.4
TOP_K = 5000
KEEP_TOP_K = 750
MAX_SIDE = 1500  # larger images are scaled to a longer side of RESIZED_SIDE before detection
RESIZED_SIDE = 1000


def conv_bn(cin: int, cout: int, kernel: int, relu: bool) -> nn.Sequential:
    """conv (no bias, 'same' padding) + BatchNorm [+ ReLU]; the Sequential indices match the official keys."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResNet50Body(nn.Module):
    """torchvision ResNet-50 up to layer4, returning the stride 8, 16 and 32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(
            self.maxpool(self.relu(self.bn1(self.conv1(x))))
        )  # [B, 3, H, W] -> [B, 256, H/4, W/4]
        c3 = self.layer2(x)  # [B, 512, H/8, W/8]
        c4 = self.layer3(c3)  # [B, 1024, H/16, W/16]
        return c3, c4, self.layer4(c4)  # c5: [B, 2048, H/32, W/32]


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.output1 = conv_bn(in_channels[0], out_channels, 1, relu=True)
        self.output2 = conv_bn(in_channels[1], out_channels, 1, relu=True)
        self.output3 = conv_bn(in_channels[2], out_channels, 1, relu=True)
        self.merge1 = conv_bn(out_channels, out_channels, 3, relu=True)
        self.merge2 = conv_bn(out_channels, out_channels, 3, relu=True)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, "5x5" and "7x7" (stacked 3x3) branches, concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3x3 = conv_bn(channels, channels // 2, 3, relu=False)
        self.conv5x5_1 = conv_bn(channels, channels // 4, 3, relu=True)
        self.conv5x5_2 = conv_bn(channels // 4, channels // 4, 3, relu=False)
        self.conv7x7_2 = conv_bn(channels // 4, channels // 4, 3, relu=True)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5x5_1(x)
        out = torch.cat(
            [self.conv3x3(x), self.conv5x5_2(branch5), self.conv7x7_3(self.conv7x7_2(branch5))], 1
        )
        return F.relu(out)


class RetinaFace(nn.Module):
    """(B, 3, H, W) -> (loc (B, A, 4), conf (B, A, 2) soft-maxed, landmarks (B, A, 10)); A = anchors."""

    num_anchors = 2

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.body = ResNet50Body()
        self.fpn = FPN((512, 1024, 2048), channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        a = self.num_anchors
        self.class_head = nn.ModuleList(nn.Conv2d(channels, a * 2, 1) for _ in STEPS)
        self.bbox_head = nn.ModuleList(nn.Conv2d(channels, a * 4, 1) for _ in STEPS)
        self.landmark_head = nn.ModuleList(nn.Conv2d(channels, a * 10, 1) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = self.fpn(self.body(x))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]

        def flat(heads: nn.ModuleList, width: int) -> torch.Tensor:
            # [B, a*width, h, w] -> [B, h*w*a, width], anchors ordered row, column, anchor as the priors
            return torch.cat(
                [
                    head(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, width)
                    for head, f in zip(heads, features, strict=True)
                ],
                1,
            )

        loc = flat(self.bbox_head, 4)
        conf = F.softmax(flat(self.class_head, 2), dim=-1)
        return loc, conf, flat(self.landmark_head, 10)


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """cfg_re50 anchors for an ``height`` x ``width`` input: (A, 4) float32 (cx, cy, w, h), relative to the image."""
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = -(-height // step), -(-width // step)
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        per_size = [
            torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], dim=-1)
            for s in sizes
        ]
        levels.append(torch.stack(per_size, dim=2).reshape(-1, 4))  # row, column, size
    return torch.cat(levels).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(A, 4) offsets -> (A, 4) x1, y1, x2, y2 relative to the image."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=1)


def decode_landmarks(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(A, 10) offsets -> (A, 5, 2) points (x, y) relative to the image."""
    return priors[:, None, :2] + offsets.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]


@dataclass
class FaceDetections:
    """Faces of one image, best score first: ``boxes`` (k, 4) x1, y1, x2, y2, ``scores`` (k,) and ``landmarks``
    (k, 5, 2) (eyes, nose, mouth corners) in image pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray


def decode_detections(
    loc: torch.Tensor,
    conf: torch.Tensor,
    landmarks: torch.Tensor,
    image_size: tuple[int, int],
    *,
    confidence_threshold: float = CONFIDENCE_THRESHOLD,
    nms_iou: float = NMS_IOU,
) -> list[FaceDetections]:
    """Network outputs for a batch of ``image_size`` = (height, width) inputs -> faces per image, as the reference's
    ``RetinaFaceDetection.detect`` (threshold, top 5000 by score, NMS, keep 750)."""
    height, width = image_size
    priors = prior_boxes(height, width).to(loc.device)
    scale = torch.tensor([width, height], dtype=torch.float32, device=loc.device)
    results = []
    for b in range(loc.shape[0]):
        boxes = (decode_boxes(loc[b].float(), priors) * scale.repeat(2)).cpu().numpy()
        points = (decode_landmarks(landmarks[b].float(), priors) * scale).cpu().numpy()
        scores = conf[b, :, 1].float().cpu().numpy()
        selected = np.where(scores > confidence_threshold)[0]
        selected = selected[scores[selected].argsort()[::-1][:TOP_K]]
        boxes, points, scores = boxes[selected], points[selected], scores[selected]
        keep = nms(boxes, scores, nms_iou)[:KEEP_TOP_K]
        results.append(FaceDetections(boxes[keep], scores[keep], points[keep]))
    return results


def detect_faces(
    model: RetinaFace,
    image_bgr: np.ndarray,
    *,
    confidence_threshold: float = CONFIDENCE_THRESHOLD,
    nms_iou: float = NMS_IOU,
) -> FaceDetections:
    """One (H, W, 3) BGR uint8 image -> its faces in image pixels (images over 1500 px are detected at 1000)."""
    image = np.float32(image_bgr)
    factor = 1.0
    if max(image.shape[:2]) > MAX_SIDE:
        factor = RESIZED_SIDE / max(image.shape[:2])
        image = cv2.resize(image, (0, 0), fx=factor, fy=factor)
    image -= np.float32(BGR_MEANS)
    device = next(model.parameters()).device
    x = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0).to(device)
    with torch.inference_mode():
        loc, conf, landmarks = model(x)
    faces = decode_detections(
        loc, conf, landmarks, image.shape[:2], confidence_threshold=confidence_threshold, nms_iou=nms_iou
    )[0]
    return FaceDetections(faces.boxes / factor, faces.scores, faces.landmarks / factor)


def _rename(key: str) -> str:
    for official, own in (
        ("ClassHead.", "class_head."),
        ("BboxHead.", "bbox_head."),
        ("LandmarkHead.", "landmark_head."),
    ):
        if key.startswith(official):
            return own + key.removeprefix(official).replace(".conv1x1.", ".")
    if key.startswith("ssh"):
        return key.lower()  # conv3X3 / conv5X5_1 / conv7X7_2 / conv7x7_3 -> lower case
    return key


def checkpoint_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: RetinaFace
) -> dict[str, torch.Tensor]:
    """Official keys -> this module's (``ClassHead.<i>.conv1x1`` -> ``class_head.<i>``, SSH names lower-cased)."""
    return {_rename(k): v for k, v in state_dict.items()}


def load_retinaface(path: str | Path, device: torch.device | str = "cpu") -> RetinaFace:
    """Build :class:`RetinaFace` from its official file: optional ``['state_dict']``, a leading ``module.``
    removed. The reference loads with strict=False; here missing keys are an error, extra ones are reported."""
    state_dict = read_checkpoint(path, name=CHECKPOINT_NAME, container_keys=("state_dict",))
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model, _ = build_checked(
        RetinaFace,
        state_dict,
        checkpoint_filter_fn,
        name=CHECKPOINT_NAME,
        allow_unexpected=True,
        device=device,
    )
    return model

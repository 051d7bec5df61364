"""S3FD face detector (the checkpoint face_alignment downloads) and its box decoding.

A VGG-16 trunk (conv1_1 .. conv5_3, fc6/fc7 as convs, two extra stages) with L2-normalised taps at conv3_3,
conv4_3 and conv5_3, and six 3x3 classification/regression heads at strides 4 .. 128. The stride-4 head
predicts three background logits and keeps their maximum ("max-out background"). Decoding follows the
reference's face_detect: softmax over the two classes, anchors of side 4 * stride centred on each cell,
variances (0.1, 0.2), candidates with face score > 0.05, NMS at IoU 0.3, faces with score > 0.5.

Input: (B, 3, H, W) float, 0..255 scale minus the Caffe means (104, 117, 123). The reference's face_detect
(the boxes of its E-Net crops) feeds RGB data; face_alignment (inside its landmark step) feeds BGR;
:func:`prepare_batch` builds either from RGB frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retalk.checkpoints.catalogue import S3FD as CHECKPOINT_NAME
from retalk.models.checkpoint import build_checked, read_checkpoint

CAFFE_MEANS = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
CANDIDATE_THRESHOLD = 0.05
NMS_IOU = 0.3
SCORE_THRESHOLD = 0.5


class L2Norm(nn.Module):
    """x / (||x||_2 over channels + 1e-10) * per-channel scale."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)


class S3FD(nn.Module):
    """(B, 3, H, W) -> [cls1, reg1, ..., cls6, reg6]: (B, 2, h_i, w_i) raw logits and (B, 4, h_i, w_i) offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1_1, self.conv1_2 = _conv(3, 64), _conv(64, 64)
        self.conv2_1, self.conv2_2 = _conv(64, 128), _conv(128, 128)
        self.conv3_1, self.conv3_2, self.conv3_3 = _conv(128, 256), _conv(256, 256), _conv(256, 256)
        self.conv4_1, self.conv4_2, self.conv4_3 = _conv(256, 512), _conv(512, 512), _conv(512, 512)
        self.conv5_1, self.conv5_2, self.conv5_3 = _conv(512, 512), _conv(512, 512), _conv(512, 512)
        self.fc6 = _conv(512, 1024, padding=3)
        self.fc7 = _conv(1024, 1024, kernel=1, padding=0)
        self.conv6_1, self.conv6_2 = _conv(1024, 256, kernel=1, padding=0), _conv(256, 512, stride=2)
        self.conv7_1, self.conv7_2 = _conv(512, 128, kernel=1, padding=0), _conv(128, 256, stride=2)

        self.conv3_3_norm = L2Norm(256, scale=10)
        self.conv4_3_norm = L2Norm(512, scale=8)
        self.conv5_3_norm = L2Norm(512, scale=5)

        self.conv3_3_norm_mbox_conf = _conv(256, 4)  # 3 background logits + face
        self.conv3_3_norm_mbox_loc = _conv(256, 4)
        self.conv4_3_norm_mbox_conf, self.conv4_3_norm_mbox_loc = _conv(512, 2), _conv(512, 4)
        self.conv5_3_norm_mbox_conf, self.conv5_3_norm_mbox_loc = _conv(512, 2), _conv(512, 4)
        self.fc7_mbox_conf, self.fc7_mbox_loc = _conv(1024, 2), _conv(1024, 4)
        self.conv6_2_mbox_conf, self.conv6_2_mbox_loc = _conv(512, 2), _conv(512, 4)
        self.conv7_2_mbox_conf, self.conv7_2_mbox_loc = _conv(256, 2), _conv(256, 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        def relu_chain(h: torch.Tensor, *convs: nn.Conv2d) -> torch.Tensor:
            for conv in convs:
                h = F.relu(conv(h), inplace=True)  # in place: one fresh full-size tensor a layer, not two
            return h

        h = F.max_pool2d(relu_chain(x, self.conv1_1, self.conv1_2), 2, 2)  # [B, 3, H, W] -> [B, 64, H/2, W/2]
        h = F.max_pool2d(relu_chain(h, self.conv2_1, self.conv2_2), 2, 2)  # -> [B, 128, H/4, W/4]
        f3_3 = relu_chain(h, self.conv3_1, self.conv3_2, self.conv3_3)  # stride 4
        f4_3 = relu_chain(F.max_pool2d(f3_3, 2, 2), self.conv4_1, self.conv4_2, self.conv4_3)  # stride 8
        f5_3 = relu_chain(F.max_pool2d(f4_3, 2, 2), self.conv5_1, self.conv5_2, self.conv5_3)  # stride 16
        ffc7 = relu_chain(F.max_pool2d(f5_3, 2, 2), self.fc6, self.fc7)  # stride 32
        f6_2 = relu_chain(ffc7, self.conv6_1, self.conv6_2)  # stride 64
        f7_2 = relu_chain(f6_2, self.conv7_1, self.conv7_2)  # stride 128

        f3_3, f4_3, f5_3 = self.conv3_3_norm(f3_3), self.conv4_3_norm(f4_3), self.conv5_3_norm(f5_3)
        conf1 = self.conv3_3_norm_mbox_conf(f3_3)
        background = torch.max(torch.max(conf1[:, 0:1], conf1[:, 1:2]), conf1[:, 2:3])
        return [
            torch.cat([background, conf1[:, 3:4]], dim=1),
            self.conv3_3_norm_mbox_loc(f3_3),
            self.conv4_3_norm_mbox_conf(f4_3),
            self.conv4_3_norm_mbox_loc(f4_3),
            self.conv5_3_norm_mbox_conf(f5_3),
            self.conv5_3_norm_mbox_loc(f5_3),
            self.fc7_mbox_conf(ffc7),
            self.fc7_mbox_loc(ffc7),
            self.conv6_2_mbox_conf(f6_2),
            self.conv6_2_mbox_loc(f6_2),
            self.conv7_2_mbox_conf(f7_2),
            self.conv7_2_mbox_loc(f7_2),
        ]


def prepare_batch(
    frames_rgb: np.ndarray, *, feed: str = "rgb", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB frames -> the network input (B, 3, H, W) float32 minus the Caffe means, on ``device``
    (the frames travel as uint8).

    ``feed="rgb"`` is what the reference's face_detect feeds (its BGR frames reversed to RGB, then the BGR means
    (104, 117, 123) subtracted from the R, G, B channels); ``feed="bgr"`` is face_alignment's (BGR order minus the
    same means).
    """
    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) frames, got shape {frames_rgb.shape}")
    if feed not in ("rgb", "bgr"):
        raise ValueError(f"feed must be 'rgb' or 'bgr', got {feed!r}")
    frames = frames_rgb[..., ::-1] if feed == "bgr" else frames_rgb
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    return x - torch.tensor(CAFFE_MEANS, device=x.device).view(1, 3, 1, 1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS with the reference's ``+1`` pixel areas; indices kept, highest score first."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode_detections(
    outputs: Sequence[torch.Tensor],
    *,
    candidate_threshold: float = CANDIDATE_THRESHOLD,
    nms_iou: float = NMS_IOU,
    score_threshold: float = SCORE_THRESHOLD,
) -> list[np.ndarray]:
    """Network outputs of a batch -> per image a (k, 5) float32 array ``x1, y1, x2, y2, score``, best first.

    Same result as the reference's per-anchor Python loop, vectorised: for each head i (stride 2**(i+2)),
    every cell with face probability > ``candidate_threshold`` is decoded against its anchor. (The reference's
    batch version also decodes cells where only *another* image passed the threshold; such candidates score
    below every kept face, so they cannot suppress one in NMS and are dropped by the final threshold.)
    """
    batch = outputs[0].shape[0]
    per_image: list[list[np.ndarray]] = [[] for _ in range(batch)]
    for level in range(len(outputs) // 2):
        probs = F.softmax(outputs[2 * level].float(), dim=1)[:, 1].cpu()  # [B, h, w]
        offsets = outputs[2 * level + 1].float().cpu()  # [B, 4, h, w]
        stride = 2 ** (level + 2)
        for b in range(batch):
            ys, xs = torch.nonzero(probs[b] > candidate_threshold, as_tuple=True)
            if ys.numel() == 0:
                continue
            loc = offsets[b, :, ys, xs].T  # [n, 4]
            centre = torch.stack([xs, ys], dim=1).float() * stride + stride / 2
            size = float(stride * 4)
            xy = centre + loc[:, :2] * VARIANCES[0] * size
            wh = size * torch.exp(loc[:, 2:] * VARIANCES[1])
            top_left = xy - wh / 2
            boxes = torch.cat([top_left, top_left + wh, probs[b, ys, xs, None]], dim=1)
            per_image[b].append(boxes.numpy())
    results = []
    for candidates in per_image:
        dets = np.concatenate(candidates) if candidates else np.zeros((0, 5), np.float32)
        dets = dets[nms(dets[:, :4], dets[:, 4], nms_iou)] if len(dets) else dets
        results.append(dets[dets[:, 4] > score_threshold].astype(np.float32))
    return results


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: S3FD) -> dict[str, torch.Tensor]:
    """The official keys are this module's own (``conv1_1.weight`` ... ``conv7_2_mbox_loc.bias``)."""
    return dict(state_dict)


def load_s3fd(path: str | Path, device: torch.device | str = "cpu") -> S3FD:
    """Build :class:`S3FD` from its official file (plain state dict, strict as the reference)."""
    state_dict = read_checkpoint(path, name=CHECKPOINT_NAME)
    return build_checked(S3FD, state_dict, checkpoint_filter_fn, name=CHECKPOINT_NAME, device=device)[0]

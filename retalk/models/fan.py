"""2D-FAN-4 landmark network (face_alignment 1.3.4's TorchScript archive) and its heat-map decoding.

The official file is a TorchScript archive, loaded as such by :func:`load_fan`. :class:`FAN` is the same
architecture in eager form (stem, four stacked hourglasses of depth 4 over 256 channels, 68 heat-maps at
64x64 from a 256x256 crop; key names as face_alignment's), used to write a synthetic archive filled by the
project's deterministic weight rule (:func:`write_synthetic_archive`) so the loader and the landmark stage can
be exercised without the real file.

The pure functions reproduce face_alignment 1.3.4's geometry: a detector box -> centre moved
up by 0.12 * box height and scale (w + h) / 195 -> a 256x256 crop (:func:`crop_face`) -> heat-maps -> arg-max
with a quarter-pixel shift towards the larger neighbour -> image pixels (:func:`heatmaps_to_landmarks`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retalk.checkpoints.catalogue import FAN as CHECKPOINT_NAME
from retalk.errors import CheckpointError
from retalk.synthetic import deterministic_state_dict

NUM_LANDMARKS = 68
CROP_SIZE = 256
REFERENCE_SCALE = 195.0  # S3FD's reference scale in face_alignment: scale = (w + h) / 195
CENTER_SHIFT = 0.12  # the crop centre is moved up by this fraction of the box height


class ConvBlock(nn.Module):
    """Pre-activation block: three 3x3 convs of C/2, C/4, C/4 channels, concatenated, plus a (projected) skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout // 2, 3, padding=1, bias=False)
        self.bn2, self.conv2 = (
            nn.BatchNorm2d(cout // 2),
            nn.Conv2d(cout // 2, cout // 4, 3, padding=1, bias=False),
        )
        self.bn3, self.conv3 = (
            nn.BatchNorm2d(cout // 4),
            nn.Conv2d(cout // 4, cout // 4, 3, padding=1, bias=False),
        )
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False))
            if cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass; level ``n`` holds ``b1_n`` (full-resolution branch), ``b2_n`` (after 2x2 average
    pooling), the next level (or ``b2_plus_1`` at the bottom) and ``b3_n`` before nearest up-sampling."""

    def __init__(self, depth: int, channels: int) -> None:
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))
        self.add_module("b2_plus_1", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self._modules[f"b1_{level}"](x)
        lower = self._modules[f"b2_{level}"](F.avg_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self._modules["b2_plus_1"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FAN(nn.Module):
    """(B, 3, 256, 256) RGB in [0, 1] -> (B, 68, 64, 64) heat-maps of the last stack (what the archive returns)."""

    def __init__(self, num_stacks: int = 4) -> None:
        super().__init__()
        self.num_stacks = num_stacks
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for i in range(num_stacks):
            self.add_module(f"m{i}", HourGlass(4, 256))
            self.add_module(f"top_m_{i}", ConvBlock(256, 256))
            self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
            self.add_module(f"l{i}", nn.Conv2d(256, NUM_LANDMARKS, 1))
            if i < num_stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(256, 256, 1))
                self.add_module(f"al{i}", nn.Conv2d(NUM_LANDMARKS, 256, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 3, 256, 256] -> [B, 64, 128, 128]
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)  # -> [B, 128, 64, 64]
        previous = self.conv4(self.conv3(x))  # -> [B, 256, 64, 64]
        for i in range(self.num_stacks):
            features = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](previous))
            features = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](features)))
            heatmaps = self._modules[f"l{i}"](features)  # -> [B, 68, 64, 64]
            if i < self.num_stacks - 1:
                previous = previous + self._modules[f"bl{i}"](features) + self._modules[f"al{i}"](heatmaps)
        return heatmaps


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is the official file format; silence torch's deprecation notices for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        yield


def write_synthetic_archive(path: str | Path) -> Path:
    """Write a TorchScript FAN filled by the deterministic weight rule (keys = face_alignment's) to ``path``."""
    path = Path(path)
    model = FAN()
    entries = [(key, tuple(t.shape), str(t.dtype)) for key, t in model.state_dict().items()]
    model.load_state_dict(deterministic_state_dict(entries))
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with _quiet_jit(), torch.inference_mode(False), torch.no_grad():
            # every op is size-generic, so a small example traces the same graph as a 256 x 256 one
            traced = torch.jit.trace(model, torch.zeros(1, 3, 64, 64), check_trace=False)
            torch.jit.save(traced, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_fan(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load the official TorchScript archive; a CheckpointError names a missing, truncated or
    non-TorchScript file, or one whose network does not map an image to 68 heat-maps at a quarter of its size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{CHECKPOINT_NAME}: no file at {path}; run `retalk models fetch` or pass --checkpoints DIR"
        )
    try:
        with _quiet_jit():
            model = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{CHECKPOINT_NAME}: {path} is truncated or not a TorchScript archive ({detail}); "
            "delete it and run `retalk models fetch`"
        ) from err
    model.eval()
    probe = torch.zeros(1, 3, 64, 64, device=device)
    try:
        with torch.inference_mode():
            out = model(probe)
    except Exception as err:  # any failure of a foreign archive's forward means it is not 2D-FAN
        raise CheckpointError(
            f"{CHECKPOINT_NAME}: {path} does not run as a 2D-FAN network ({err}); is it the right file?"
        ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, NUM_LANDMARKS, 16, 16):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(
            f"{CHECKPOINT_NAME}: {path} gives {got} instead of (1, 68, H/4, W/4) heat-maps; is it the right file?"
        )
    return model


def box_to_center_scale(box: Sequence[float]) -> tuple[np.ndarray, float]:
    """Detector box (x1, y1, x2, y2[, score]) -> (crop centre (2,), scale) as face_alignment 1.3.4 computes them."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    center = np.array([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0 - (y2 - y1) * CENTER_SHIFT])
    return center, (x2 - x1 + y2 - y1) / REFERENCE_SCALE


def _crop_to_image(points: np.ndarray, center: np.ndarray, scale: float, resolution: float) -> np.ndarray:
    """Points of a ``resolution``-sized crop -> image pixels (the inverse of face_alignment's crop transform)."""
    h = 200.0 * scale
    return points * (h / resolution) + (np.asarray(center, np.float64) - h / 2.0)


def crop_face(image: np.ndarray, center: np.ndarray, scale: float, resolution: int = CROP_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 image -> (resolution, resolution, 3) uint8 crop around ``center``, zero outside the image.

    As face_alignment: the corners (1, 1) and (res, res) are mapped to the image and truncated to integers, the
    window is copied into a zero canvas and resized with INTER_LINEAR.
    """
    ul = np.trunc(_crop_to_image(np.array([1.0, 1.0]), center, scale, resolution)).astype(np.int64)
    br = np.trunc(_crop_to_image(np.array([resolution, resolution], np.float64), center, scale, resolution))
    br = br.astype(np.int64)
    height, width = image.shape[:2]
    canvas = np.zeros((br[1] - ul[1], br[0] - ul[0], image.shape[2]), np.uint8)
    new_x = (max(1, -ul[0] + 1), min(br[0], width) - ul[0])
    new_y = (max(1, -ul[1] + 1), min(br[1], height) - ul[1])
    old_x = (max(1, ul[0] + 1), min(br[0], width))
    old_y = (max(1, ul[1] + 1), min(br[1], height))
    canvas[new_y[0] - 1 : new_y[1], new_x[0] - 1 : new_x[1]] = image[
        old_y[0] - 1 : old_y[1], old_x[0] - 1 : old_x[1]
    ]
    return cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_LINEAR)


def crop_to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(B, 256, 256, 3) uint8 crops -> the FAN input (B, 3, 256, 256) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(255.0)


def heatmaps_to_landmarks(
    heatmaps: np.ndarray | torch.Tensor,
    centers: np.ndarray,
    scales: np.ndarray | Sequence[float],
    *,
    truncate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(B, 68, h, w) heat-maps + per-item crop centre (B, 2) and scale (B,) -> landmarks (B, 68, 2) as
    (points in the 256 crop, points in image pixels).

    Arg-max cell (first maximum), shifted by 0.25 towards the larger neighbour on each axis for cells off the
    border, minus 0.5. face_alignment 1.3.4 truncates the image points to integers (``truncate=True``).
    """
    hm = (
        heatmaps.detach().float().cpu().numpy()
        if isinstance(heatmaps, torch.Tensor)
        else np.asarray(heatmaps)
    )
    b, c, h, w = hm.shape
    flat = hm.reshape(b, c, h * w).argmax(axis=2)
    px, py = flat % w, flat // w
    preds = np.stack([px, py], axis=-1).astype(np.float32) + 1
    inner = (px > 0) & (px < w - 1) & (py > 0) & (py < h - 1)
    bi, ci = np.nonzero(inner)
    x, y = px[bi, ci], py[bi, ci]
    diff = np.stack(
        [hm[bi, ci, y, x + 1] - hm[bi, ci, y, x - 1], hm[bi, ci, y + 1, x] - hm[bi, ci, y - 1, x]], axis=-1
    )
    preds[bi, ci] += np.sign(diff).astype(np.float32) * 0.25
    preds -= 0.5
    centers = np.asarray(centers, np.float64).reshape(b, 1, 2)
    scales = np.asarray(scales, np.float64).reshape(b, 1, 1)
    in_image = _crop_to_image(preds.astype(np.float64), centers, scales, float(h))
    if truncate:
        in_image = np.trunc(in_image)
    return preds * (CROP_SIZE / h), in_image


def landmarks_from_boxes(
    model: Callable[[torch.Tensor], torch.Tensor],
    images_rgb: Sequence[np.ndarray],
    boxes: np.ndarray | Sequence[Sequence[float]],
    *,
    truncate: bool = True,
) -> np.ndarray:
    """68 landmarks (k, 68, 2) in image pixels for detector box i (k, 4+) on (H, W, 3) uint8 RGB image i, as
    face_alignment 1.3.4's ``get_landmarks_from_image`` (no flip) computes them, the k crops run as one batch
    (one image with several faces: pass it once per box)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, np.shape(boxes)[-1] if np.size(boxes) else 4)
    if len(boxes) != len(images_rgb):
        raise ValueError(f"{len(boxes)} boxes for {len(images_rgb)} images: give one image per box")
    if boxes.size == 0:
        return np.zeros((0, NUM_LANDMARKS, 2))
    geometry = [box_to_center_scale(box) for box in boxes]
    crops = np.stack(
        [crop_face(image, center, scale) for image, (center, scale) in zip(images_rgb, geometry, strict=True)]
    )
    device = next(iter(model.parameters())).device if isinstance(model, nn.Module) else torch.device("cpu")
    with torch.inference_mode():
        heatmaps = model(crop_to_tensor(crops).to(device))
    centers = np.stack([center for center, _ in geometry])
    scales = np.array([scale for _, scale in geometry])
    return heatmaps_to_landmarks(heatmaps, centers, scales, truncate=truncate)[1]

"""RetinaFace-R50: anchors, decoding and detection.

Golden outputs under the deterministic weights: test_golden.py.
Loading and checkpoint errors: test_checkpoint_errors.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from retalk.models.retinaface import (
    decode_boxes,
    decode_landmarks,
    detect_faces,
    prior_boxes,
)


def test_priors_follow_cfg_re50() -> None:
    priors = prior_boxes(256, 256)
    assert priors.shape == (2 * (32 * 32 + 16 * 16 + 8 * 8), 4)  # 2688, the golden anchor count
    np.testing.assert_allclose(priors[0], [4 / 256, 4 / 256, 16 / 256, 16 / 256])  # stride 8, size 16
    np.testing.assert_allclose(priors[1], [4 / 256, 4 / 256, 32 / 256, 32 / 256])  # same cell, size 32
    np.testing.assert_allclose(priors[2], [12 / 256, 4 / 256, 16 / 256, 16 / 256])  # next column
    np.testing.assert_allclose(
        priors[-1], [240 / 256, 240 / 256, 512 / 256, 512 / 256]
    )  # stride 32, size 512
    tall = prior_boxes(100, 60)  # cells round up: 13 x 8, 7 x 4, 4 x 2
    assert tall.shape[0] == 2 * (13 * 8 + 7 * 4 + 4 * 2)
    np.testing.assert_allclose(tall[0], [4 / 60, 4 / 100, 16 / 60, 16 / 100])


def test_decoding_with_zero_offsets_returns_the_priors() -> None:
    priors = prior_boxes(64, 64)
    boxes = decode_boxes(torch.zeros(len(priors), 4), priors)
    np.testing.assert_allclose(
        boxes[1], [4 / 64 - 16 / 64, 4 / 64 - 16 / 64, 4 / 64 + 16 / 64, 4 / 64 + 16 / 64]
    )
    points = decode_landmarks(
        torch.ones(len(priors), 10), priors
    )  # every point 0.1 * prior size off the centre
    np.testing.assert_allclose(points[1], np.tile([4 / 64 + 0.1 * 32 / 64, 4 / 64 + 0.1 * 32 / 64], (5, 1)))


class _OneFace(nn.Module):
    """A stand-in network: anchor ``index`` is a face (score 0.99) with zero offsets, every other anchor is not."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.seen: list[tuple[int, ...]] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.seen.append(tuple(x.shape))
        n = len(prior_boxes(x.shape[2], x.shape[3]))
        conf = torch.tensor([1.0, 0.0]).repeat(1, n, 1)
        conf[0, self.index] = torch.tensor([0.01, 0.99])
        return torch.zeros(1, n, 4), conf, torch.zeros(1, n, 10)


def test_detect_faces_maps_large_images_back_to_their_pixels() -> None:
    model = _OneFace(index=1)  # first cell, 32 px anchor: box (-12, -12, 20, 20) in detector pixels
    image = np.zeros((3000, 2000, 3), np.uint8)  # longer side > 1500: detected at 1000 x 667, factor 1/3
    faces = detect_faces(model, image)
    assert model.seen == [(1, 3, 1000, 667)]
    np.testing.assert_allclose(faces.boxes, [[-36, -36, 60, 60]], rtol=1e-5)
    np.testing.assert_allclose(faces.scores, [0.99], rtol=1e-6)
    np.testing.assert_allclose(faces.landmarks, np.full((1, 5, 2), 12.0), rtol=1e-5)  # the anchor centre, x3
    assert len(detect_faces(model, np.zeros((200, 200, 3), np.uint8), confidence_threshold=0.995).boxes) == 0


def test_detect_faces_feeds_bgr_minus_means() -> None:
    class Probe(_OneFace):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            self.pixel = x[0, :, 0, 0].tolist()
            return super().forward(x)

    model = Probe(index=0)
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 200  # blue, in BGR
    detect_faces(model, image)
    assert model.pixel == [200 - 104, -117, -123]

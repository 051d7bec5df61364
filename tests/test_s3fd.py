"""S3FD: input construction and box decoding.

Golden outputs under the deterministic weights: test_golden.py.
Loading and checkpoint errors: test_checkpoint_errors.py.
"""

from __future__ import annotations

import numpy as np
import torch

from retalk.models.s3fd import decode_detections, nms, prepare_batch


def test_prepare_batch_subtracts_bgr_means_from_either_order() -> None:
    frames = np.zeros((1, 2, 2, 3), np.uint8)
    frames[..., 0] = 200  # red
    rgb = prepare_batch(frames, feed="rgb")
    bgr = prepare_batch(frames, feed="bgr")
    assert rgb[0, :, 0, 0].tolist() == [200 - 104, -117, -123]
    assert bgr[0, :, 0, 0].tolist() == [-104, -117, 200 - 123]


def _outputs(
    sizes: list[int], cells: dict[tuple[int, int, int], tuple[float, list[float]]]
) -> list[torch.Tensor]:
    """Head outputs with every cell background, except ``cells[(level, y, x)] = (face logit, offsets)``."""
    outputs = []
    for level, size in enumerate(sizes):
        cls = torch.zeros(1, 2, size, size)
        cls[:, 0] = 10.0  # background wins by far
        reg = torch.zeros(1, 4, size, size)
        for (lv, y, x), (logit, offsets) in cells.items():
            if lv == level:
                cls[0, 0, y, x], cls[0, 1, y, x] = 0.0, logit
                reg[0, :, y, x] = torch.tensor(offsets)
        outputs += [cls, reg]
    return outputs


def test_decoding_places_the_anchor_of_each_cell() -> None:
    sizes = [32, 16, 8, 4, 2, 1]  # a 128 x 128 input
    cells = {
        (1, 5, 7): (6.0, [0.0, 0.0, 0.0, 0.0]),  # stride 8: centre (60, 44), anchor side 32
        (3, 1, 2): (4.0, [0.5, -0.5, np.log(2) / 0.2, 0.0]),  # stride 32: centre (80, 48), side 128
    }
    faces = decode_detections(_outputs(sizes, cells))[0]
    assert faces.shape == (2, 5)
    p1, p2 = 1 / (1 + np.exp(-6.0)), 1 / (1 + np.exp(-4.0))
    np.testing.assert_allclose(faces[0], [44, 28, 76, 60, p1], rtol=1e-6)
    # centre moved by offset * 0.1 * 128, width doubled by exp(0.2 * log(2) / 0.2)
    cx, cy = 80 + 0.5 * 0.1 * 128, 48 - 0.5 * 0.1 * 128
    np.testing.assert_allclose(faces[1], [cx - 128, cy - 64, cx + 128, cy + 64, p2], rtol=1e-6)


def test_overlapping_candidates_keep_the_best_and_weak_ones_are_dropped() -> None:
    sizes = [32, 16, 8, 4, 2, 1]
    cells = {
        (0, 10, 10): (3.0, [0.0] * 4),
        (0, 10, 11): (5.0, [0.0] * 4),  # 4 px to the right: IoU 12/20 > 0.3 with the first
        (0, 20, 20): (-1.0, [0.0] * 4),  # probability 0.27: a candidate (> 0.05) but not a face (<= 0.5)
    }
    faces = decode_detections(_outputs(sizes, cells))[0]
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0, :4], [38, 34, 54, 50])
    assert len(decode_detections(_outputs(sizes, cells), score_threshold=0.2)[0]) == 2


def test_nms_uses_inclusive_pixel_areas() -> None:
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], np.float32)  # 10x10 each, overlap 5x10: IoU 50/150
    assert nms(boxes, np.array([0.9, 0.8]), 0.3).tolist() == [0]
    assert nms(boxes, np.array([0.9, 0.8]), 0.34).tolist() == [0, 1]

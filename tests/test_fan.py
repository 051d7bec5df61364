"""2D-FAN-4: the synthetic TorchScript archive, the loader's errors, and face_alignment 1.3.4's crop/heat-map geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retalk.errors import CheckpointError
from retalk.models.fan import (
    CHECKPOINT_NAME,
    FAN,
    box_to_center_scale,
    crop_face,
    crop_to_tensor,
    heatmaps_to_landmarks,
    landmarks_from_boxes,
    load_fan,
    write_synthetic_archive,
)
from retalk.synthetic import deterministic_state_dict


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_archive(tmp_path_factory.mktemp("fan") / CHECKPOINT_NAME)


def test_archive_loads_and_matches_the_eager_network(archive: Path) -> None:
    eager = FAN()
    entries = [(key, tuple(t.shape), str(t.dtype)) for key, t in eager.state_dict().items()]
    eager.load_state_dict(deterministic_state_dict(entries))
    eager.eval()
    scripted = load_fan(archive)
    assert isinstance(scripted, torch.jit.ScriptModule)
    x = torch.rand(
        1, 3, 128, 128, generator=torch.Generator().manual_seed(0)
    )  # any size: fully convolutional
    with torch.inference_mode():
        got, want = scripted(x), eager(x)
    assert got.shape == (1, 68, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert want.std() > 0  # the weights are not degenerate


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_loader_rejects_missing_truncated_and_foreign_files(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}: no file"):
        load_fan(tmp_path / "absent.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}.*truncated or not a TorchScript"):
        load_fan(truncated)
    state_dict_file = tmp_path / "state_dict.pth"  # a plain torch.save file is a zip too, but not TorchScript
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, state_dict_file)
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME}.*not a TorchScript"):
        load_fan(state_dict_file)
    other = tmp_path / "other.zip"  # TorchScript, but not 68 heat-maps at a quarter of the input size
    torch.jit.save(torch.jit.trace(nn.Conv2d(3, 5, 1), torch.zeros(1, 3, 8, 8)), str(other))
    with pytest.raises(CheckpointError, match=r"instead of \(1, 68"):
        load_fan(other)


def test_box_to_center_scale_follows_face_alignment() -> None:
    center, scale = box_to_center_scale([10.0, 20.0, 110.0, 220.0, 0.99])
    np.testing.assert_allclose(center, [60.0, 120.0 - 0.12 * 200.0])
    assert scale == pytest.approx(300.0 / 195.0)


def test_heatmap_peaks_get_quarter_pixel_shifts_and_truncated_image_points() -> None:
    hm = np.zeros((1, 68, 64, 64), np.float32)
    hm[0, :, 20, 10] = 1.0  # peak at x=10, y=20 for every landmark ...
    hm[0, 0, 20, 11], hm[0, 0, 21, 10] = 0.5, 0.5  # ... landmark 0 leans right and down
    hm[0, 1, 20, 9], hm[0, 1, 19, 10] = 0.5, 0.5  # ... landmark 1 leans left and up
    hm[0, 2, 20, 10] = 0.0
    hm[0, 2, 0, 63] = 2.0  # landmark 2 peaks on the border: no shift
    box_scale_1 = [0.0, 0.0, 97.5, 97.5]  # scale (97.5 + 97.5) / 195 = 1: a 200 px window
    center, scale = box_to_center_scale(box_scale_1)
    in_crop, in_image = heatmaps_to_landmarks(hm, center[None], [scale])
    np.testing.assert_allclose(
        in_crop[0, :3], [[10.75 * 4, 20.75 * 4], [10.25 * 4, 20.25 * 4], [63.5 * 4, 0.5 * 4]]
    )
    # image x = crop x * 200 / 64 + centre - 100, truncated towards zero as face_alignment's astype(int32)
    cx, cy = center
    expected_x = np.trunc(10.75 * 200 / 64 + cx - 100)
    expected_y = np.trunc(20.75 * 200 / 64 + cy - 100)
    assert (expected_x, expected_y) == (-17.0, 1.0)  # a negative value checks truncation, not flooring
    np.testing.assert_array_equal(in_image[0, 0], [expected_x, expected_y])
    _, precise = heatmaps_to_landmarks(hm, center[None], [scale], truncate=False)
    np.testing.assert_allclose(precise[0, 0], [10.75 * 200 / 64 + cx - 100, 20.75 * 200 / 64 + cy - 100])


def test_crop_is_black_outside_the_image_and_the_image_inside() -> None:
    image = np.full((300, 300, 3), 200, np.uint8)
    crop = crop_face(image, np.array([0.0, 0.0]), 256.0 / 200.0)  # a 256 px window centred on the corner
    assert crop.shape == (256, 256, 3)
    assert (crop[:120, :120] == 0).all()
    assert (crop[136:, 136:] == 200).all()
    x = crop_to_tensor(crop[None])
    assert (
        x.shape == (1, 3, 256, 256)
        and x.dtype == torch.float32
        and float(x.max()) == pytest.approx(200 / 255)
    )


class _PeakAt(nn.Module):
    """A stand-in FAN: every heat-map of every crop peaks at cell (x, y) of the 64 x 64 grid."""

    def __init__(self, x: int, y: int) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.crops: torch.Tensor | None = None
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self.crops = crops
        heatmaps = torch.zeros(crops.shape[0], 68, 64, 64)
        heatmaps[:, :, self.y, self.x] = 1.0
        return heatmaps


def test_landmarks_from_boxes_runs_one_batch_and_maps_each_box() -> None:
    model = _PeakAt(x=32, y=32)  # no neighbour is larger: the point is cell 32 + 1 - 0.5 = 32.5 of 64
    image = np.zeros((400, 400, 3), np.uint8)
    boxes = np.array([[100.0, 100.0, 197.5, 197.5, 0.9], [0.0, 200.0, 195.0, 395.0, 0.8]])
    landmarks = landmarks_from_boxes(model, [image, image], boxes, truncate=False)
    assert model.crops is not None and tuple(model.crops.shape) == (2, 3, 256, 256)
    for box, points in zip(boxes, landmarks, strict=True):
        center, scale = box_to_center_scale(box)
        window = 200.0 * scale  # the crop covers this many image pixels
        np.testing.assert_allclose(points, np.tile(32.5 / 64 * window + center - window / 2, (68, 1)))
    assert landmarks_from_boxes(model, [], np.zeros((0, 5))).shape == (0, 68, 2)
    with pytest.raises(ValueError, match="one image per box"):
        landmarks_from_boxes(model, [image], boxes)

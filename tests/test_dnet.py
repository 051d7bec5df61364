"""D-Net: the warp and the dead branch.

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from retalk.models.dnet import DNet, checkpoint_filter_fn, identity_grid, warp_with_flow


@pytest.fixture(scope="module")
def official_sd(reference_state_dict: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return reference_state_dict("DNet.pt")


def test_warp_only_skips_editing_and_batch_items_are_independent() -> None:
    torch.manual_seed(0)
    model = DNet().eval()
    image, coeffs = torch.rand(2, 3, 256, 256) * 2 - 1, torch.randn(2, 73, 26)
    with torch.inference_mode():
        batch = model(image, coeffs, warp_only=True)
        single = model(image[1:], coeffs[1:], warp_only=True)
    assert batch.keys() == {"flow_field", "warp_image"}
    torch.testing.assert_close(single["flow_field"], batch["flow_field"][1:], rtol=0, atol=1e-5)
    # random weights give large flows; sampling a noise image amplifies float differences a little
    torch.testing.assert_close(single["warp_image"], batch["warp_image"][1:], rtol=0, atol=1e-4)


def test_zero_flow_resamples_at_the_pixel_grid() -> None:
    # grid_sample(align_corners=False) on an align-corners grid: a zero flow is NOT the identity; it shrinks the
    # image by (n-1)/n about the centre, exactly as the reference (and a flow at the image size does the same)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    warped = warp_with_flow(image, torch.zeros(1, 2, 4, 4))
    expected = F.grid_sample(image, identity_grid(4, 4, image)[None], align_corners=False)
    torch.testing.assert_close(warped, expected, rtol=0, atol=0)
    assert not torch.allclose(warped, image)
    grid = identity_grid(3, 5, image)
    assert grid.shape == (3, 5, 2)
    torch.testing.assert_close(grid[0, :, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(grid[:, 0, 1], torch.tensor([-1.0, 0.0, 1.0]))


def test_flow_is_in_pixels_of_the_align_corners_grid() -> None:
    # flow f moves the sample by 2f/(w-1) grid units = f*w/(w-1) pixels of grid_sample(align_corners=False),
    # so f = (w-1)/w samples exactly one pixel to the right of where a zero flow samples
    w = 8
    image = torch.rand(1, 1, w, w)
    flow = torch.zeros(1, 2, w, w)
    flow[:, 0] = (w - 1) / w
    shifted = warp_with_flow(image, flow)
    baseline = warp_with_flow(torch.roll(image, shifts=-1, dims=3), torch.zeros(1, 2, w, w))
    # away from the zero-padded left edge and the wrapped right columns
    torch.testing.assert_close(shifted[..., 1:-2], baseline[..., 1:-2], rtol=0, atol=1e-6)


def test_dead_branch_keys_are_dropped_and_the_rest_load_strictly(
    official_sd: dict[str, torch.Tensor],
) -> None:
    filtered = checkpoint_filter_fn(official_sd)
    dead = [k for k in official_sd if ".res" in k and (".conv1." in k or ".norm1." in k)]
    assert len(dead) == 6 * 8  # 3 levels x 2 blocks x (conv1 w, b + norm1 6 tensors)
    assert len(filtered) == len(official_sd) - len(dead)
    assert DNet().state_dict().keys() == filtered.keys()

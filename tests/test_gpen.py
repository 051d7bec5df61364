"""GPEN-BFR-512: batching.

Golden outputs under the deterministic weights: test_golden.py.
Loading and checkpoint errors: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from retalk.models.gpen import GPEN


def test_batch_items_are_independent_and_repeatable(
    randomize_weights: Callable[[torch.nn.Module, int], torch.nn.Module],
) -> None:
    model = randomize_weights(GPEN(size=64, style_dim=32, n_mlp=2, narrow=1 / 16), seed=0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        batched = model(x)
        single = model(x[1:])
        again = model(x[1:])
    assert batched.shape == (2, 3, 64, 64)
    assert torch.equal(single, again)
    # random weights amplify float32 reordering (grouped vs single convs) with depth; compare relative to the peak
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-5 * float(single.abs().max()))
    assert not torch.allclose(batched[0], batched[1], atol=1e-3 * float(single.abs().max()))

"""GFPGAN v1.3 (clean): noise modes, batching, its containers.

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from retalk.models.gfpgan import GFPGANv1Clean, load_gfpgan

NAME = "GFPGANv1.3.pth"


@pytest.fixture(scope="module")
def small_model(randomize_weights: Callable[[torch.nn.Module, int], torch.nn.Module]) -> GFPGANv1Clean:
    """A narrow 64 px GFPGAN with random weights: the same code paths at a fraction of the cost."""
    model = randomize_weights(GFPGANv1Clean(out_size=64, style_dim=32, narrow=1 / 16), seed=0)
    with torch.no_grad():
        for i, buffer in enumerate(model.noises.buffers()):
            buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(100 + i)))
    return model


def test_stored_noise_is_the_default_and_a_generator_replaces_it(small_model: GFPGANv1Clean) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    stored = [getattr(small_model.noises, f"noise{i}") for i in range(small_model.decoder.num_layers)]
    with torch.inference_mode():
        default = small_model(x)
        explicit = small_model(x, noise=stored)
        seeded = small_model(x, generator=torch.Generator().manual_seed(3))
        seeded_again = small_model(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(default, explicit)
    assert torch.equal(seeded, seeded_again)
    assert not torch.allclose(default, seeded, atol=1e-3)


def test_batch_items_are_independent(small_model: GFPGANv1Clean) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        batched = small_model(x)
        single = small_model(x[1:])
    assert batched.shape == (2, 3, 64, 64)
    # random weights amplify float32 reordering (grouped vs single convs) with depth; compare relative to the peak
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-5 * float(single.abs().max()))


def test_unused_heads_are_dropped_and_the_fallback_container_loads(
    reference_shaped_state_dict: Callable[[str], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    torch.save({"params": reference_shaped_state_dict(NAME)}, tmp_path / NAME)  # the fallback container key
    assert isinstance(load_gfpgan(tmp_path / NAME), GFPGANv1Clean)

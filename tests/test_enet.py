"""E-Net: its noise, and loading (L-Net only from LNet.pth).

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from retalk.models.enet import ENet, load_enet

NAME = "ENet.pth"


class _StubLNet(nn.Module):
    """Stands in for L-Net where only E-Net's own layers matter: (mel, face96) -> (B, 3, 96, 96) in (0, 1)."""

    def forward(self, mel: Tensor, face: Tensor) -> Tensor:
        return torch.sigmoid(face[:, :3] - face[:, 3:] + mel.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def shaped_lnet(
    reference_shaped_state_dict: Callable[[str], dict[str, Tensor]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny LNet.pth with every official key (all ones) in the official container."""
    path = tmp_path_factory.mktemp("lnet") / "LNet.pth"
    torch.save({"state_dict": reference_shaped_state_dict("LNet.pth")}, path)
    return path


def test_default_noise_is_fixed_and_the_same_for_every_frame(
    randomize_weights: Callable[[nn.Module, int], nn.Module],
) -> None:
    model = randomize_weights(ENet(_StubLNet()), seed=0)
    rng = torch.Generator().manual_seed(1)
    mel, img_batch = torch.randn(2, 1, 80, 16, generator=rng), torch.rand(2, 6, 384, 384, generator=rng)
    with torch.inference_mode():
        batched, low_res = model(mel, img_batch, img_batch[:, 3:])
        single, _ = model(mel[1:], img_batch[1:], img_batch[1:, 3:])
    assert batched.shape == (2, 3, 384, 384) and low_res.shape == (2, 3, 96, 96)
    # a frame renders the same alone or in a batch: the default noise is seeded and shared by all frames
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-5 * float(single.abs().max()))


def test_low_res_keys_of_enet_pth_are_ignored(
    reference_manifest: Callable[[str], dict],
    reference_shaped_state_dict: Callable[[str], dict[str, Tensor]],
    shaped_lnet: Path,
    tmp_path: Path,
) -> None:
    own = reference_shaped_state_dict(NAME)
    lnet_keys = [key for key, *_ in reference_manifest("LNet.pth")["entries"]]
    # a DataParallel-style file that also carries an (ignored) embedded L-Net full of sevens
    state_dict = {f"module.{k}": v for k, v in own.items()}
    state_dict.update({f"module.low_res.{k}": torch.full((), 7.0) for k in lnet_keys})
    torch.save({"state_dict": state_dict}, tmp_path / NAME)
    model = load_enet(tmp_path / NAME, shaped_lnet)
    assert all(not (t == 7).any() for t in model.lnet.state_dict().values())
    assert torch.equal(model.conv_body_first.weight, torch.ones(256, 3, 1, 1))

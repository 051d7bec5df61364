"""L-Net: the spectral-norm fold, its vectors and extra keys.

Golden outputs under the deterministic weights: test_golden.py.
Missing keys, truncated and foreign files: test_checkpoint_errors.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from retalk.errors import CheckpointError
from retalk.models.lnet import LNet, fold_spectral_norm, lnet_state_dict_from_official, load_lnet

CHECKPOINT = "LNet.pth"  # the file of the shaped_sd fixture (conftest.py)


def test_batch_items_are_independent() -> None:
    torch.manual_seed(0)
    model = LNet(base_channels=16, max_channels=64, num_res_blocks=1).eval()  # same structure, small and fast
    mel, face = torch.randn(2, 1, 80, 16), torch.rand(2, 6, 96, 96)
    with torch.inference_mode():
        batched = model(mel, face)
        single = model(mel[1:], face[1:])
    assert batched.shape == (2, 3, 96, 96)
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-5)


def test_spectral_norm_fold_equals_torch_eval_spectral_norm() -> None:
    torch.manual_seed(1)
    conv = torch.nn.utils.spectral_norm(torch.nn.Conv2d(8, 16, 3))
    conv.train()
    conv(torch.randn(1, 8, 5, 5))  # one power iteration so that u, v are not the initial draw
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 8, 5, 5))  # eval: weight = weight_orig / (u . W v), u and v as stored
    stored = {k: v.detach() for k, v in conv.state_dict().items()}
    folded = fold_spectral_norm({f"c.{k}": v for k, v in stored.items()})
    assert set(folded) == {"c.weight", "c.bias"}
    assert torch.equal(folded["c.weight"], conv.weight.detach())


def test_reference_key_transform_strips_module_and_drops_low_res(shaped_sd: dict[str, torch.Tensor]) -> None:
    wrapped = {f"module.{k}": v for k, v in shaped_sd.items()}
    # the reference drops every key containing low_res (here one that would not even fit)
    wrapped["low_res.module.decoder.final.model.0.bias"] = torch.zeros(7)
    plain = lnet_state_dict_from_official(shaped_sd)
    assert lnet_state_dict_from_official(wrapped).keys() == plain.keys()
    with torch.device("meta"):  # keys and shapes only, no weights allocated
        expected = {k: v.shape for k, v in LNet().state_dict().items()}
    assert {k: v.shape for k, v in plain.items()} == expected


@pytest.mark.parametrize("weight_v", [None, torch.ones(5)], ids=["absent", "wrong-shape"])
def test_bad_spectral_norm_vectors_are_a_missing_weight(
    shaped_sd: dict[str, torch.Tensor], tmp_path: Path, weight_v: torch.Tensor | None
) -> None:
    bad = {k: v for k, v in shaped_sd.items() if k != "decoder.jump2.model.0.weight_v"}
    if weight_v is not None:
        bad["decoder.jump2.model.0.weight_v"] = weight_v
    torch.save({"state_dict": bad}, tmp_path / "LNet.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): decoder\.jumps\.2\.conv\.weight"):
        load_lnet(tmp_path / "LNet.pth")


def test_extra_keys_load_with_a_warning(
    shaped_sd: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the reference loads LNet.pth with strict=False: entries the network does not use are tolerated, but named
    torch.save({"state_dict": {**shaped_sd, "disc.head.weight": torch.zeros(2)}}, tmp_path / "LNet.pth")
    with caplog.at_level(logging.WARNING, logger="retalk.models.lnet"):
        model = load_lnet(tmp_path / "LNet.pth")
    assert not model.training
    assert "disc.head.weight" in caplog.text

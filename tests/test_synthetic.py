"""retalk.synthetic reproduces the reference weight rule (detweights.py) bit for bit."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from retalk.synthetic import (
    deterministic_state_dict,
    deterministic_tensor,
    noise_tensor,
    state_dict_sha256,
    tensor_sha256,
)


@pytest.fixture(scope="module")
def detweights(reference_dir):
    spec = importlib.util.spec_from_file_location("detweights", reference_dir / "detweights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_manifest_fill_matches_its_sha256(reference_dir):
    manifests = sorted((reference_dir / "manifests").glob("*.json"))
    assert len(manifests) == 10
    for path in manifests:
        manifest = json.loads(path.read_text())
        state = deterministic_state_dict(manifest["entries"])
        assert list(state) == [e[0] for e in manifest["entries"]], path.name  # manifest order kept
        assert state_dict_sha256(state) == manifest["fill_sha256"], path.name
        del state


@pytest.mark.parametrize(
    ("key", "shape", "dtype", "gain"),
    [
        ("conv.weight", (8, 4, 3, 3), "float32", 1.0),
        ("style.1.weight", (16, 16), "float32", 22.6),
        ("bn.running_var", (7,), "float32", 1.0),
        ("bn.running_mean", (7,), "float32", 1.0),
        ("bn.num_batches_tracked", (), "int64", 1.0),
        ("norm.weight", (5,), "float32", 1.0),
        ("conv.bias", (5,), "float32", 1.0),
        ("scalar", (), "float32", 1.0),
        ("half.weight", (3, 2), "float16", 1.0),
    ],
)
def test_base_rule_is_bitwise_the_reference(detweights, key, shape, dtype, gain):
    ours = deterministic_tensor(key, shape, dtype, gain=gain)
    theirs = detweights.deterministic_tensor(key, shape, dtype, gain=gain)
    assert ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape)
    assert torch.equal(ours, theirs)
    assert tensor_sha256(ours) == detweights.tensor_sha256(theirs)


def test_noise_is_bitwise_the_reference(detweights):
    name, shape = "ENet.style_convs.0.noise.v0", (2, 1, 20, 20)
    assert torch.equal(noise_tensor(name, shape), detweights.noise_tensor(name, shape))


def test_options_const_unit_randn_spectral_v():
    entries = [
        ["c.weight_orig", [6, 3, 3, 3], "float32"],
        ["c.weight_u", [6], "float32", {"init": "unit_randn"}],
        [
            "c.weight_v",
            [27],
            "float32",
            {"init": "spectral_v", "weight": "c.weight_orig", "u": "c.weight_u", "dim": 0},
        ],
        ["blur.kernel", [2, 2], "float32", {"const": [0.25, 0.25, 0.25, 0.25]}],
        ["g.weight", [4, 9], "float32", {"gain": 3.0}],
    ]
    state = deterministic_state_dict(entries)
    assert list(state) == [e[0] for e in entries]
    assert math.isclose(float(state["c.weight_u"].double().norm()), 1.0, rel_tol=1e-6)
    weight = state["c.weight_orig"].reshape(6, -1).double()
    v = state["c.weight_v"].double()
    # v is W^T u normalised, so sigma = u . (W v) equals ||W^T u|| > 0
    sigma = float(state["c.weight_u"].double() @ (weight @ v))
    assert sigma > 0 and math.isclose(
        sigma, float((weight.t() @ state["c.weight_u"].double()).norm()), rel_tol=1e-5
    )
    assert torch.equal(state["blur.kernel"], torch.full((2, 2), 0.25))
    assert torch.equal(state["g.weight"], deterministic_tensor("g.weight", (4, 9), gain=3.0))
    assert not torch.equal(state["g.weight"], deterministic_tensor("g.weight", (4, 9)))


def test_rule_ranges_and_key_dependence():
    assert torch.equal(deterministic_tensor("a.weight", (64, 32)), deterministic_tensor("a.weight", (64, 32)))
    assert not torch.equal(
        deterministic_tensor("a.weight", (64, 32)), deterministic_tensor("b.weight", (64, 32))
    )
    var = deterministic_tensor("x.running_var", (1000,))
    assert float(var.min()) >= 1.0 and float(var.max()) <= 1.1
    weight = deterministic_tensor("x.weight", (256, 64, 3, 3))
    assert abs(float(weight.std()) - 1 / math.sqrt(64 * 9)) < 0.01 / math.sqrt(64 * 9) * 10
    assert torch.count_nonzero(deterministic_tensor("x.num_batches_tracked", (), "int64")) == 0

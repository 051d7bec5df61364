"""The CPU backends (retalk.engines.backends): the OpenVINO wrapper keeps the torch module's call and outputs,
converts once per input signature and reuses the stored model in a fresh process, stays on torch when the
converted model disagrees, and the ``backend`` job option reaches the neural engine and its cache keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from retalk_protocol.options import JOB_OPTIONS
from torch import nn

from retalk import checkpoints
from retalk.checkpoints.catalogue import GANIMATION
from retalk.engines import backends
from retalk.engines.neural import NeuralEngine
from retalk.errors import InputError
from retalk.pipeline.request import RedubRequest
from retalk.selftest import COMPACT_GOLDEN, compare, run_selftest

pytest.importorskip("openvino")


class Nested(nn.Module):
    """Positional and keyword inputs, a list among them, and nested outputs (a dict holding a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale, noise=()):
        y = self.conv(x) * scale[:, :, None, None]
        for n in noise:
            y = y + n
        return {"image": torch.tanh(y), "parts": (y.mean((2, 3)), y.amax(1))}


class Noisy(nn.Module):
    """Draws its own noise: a converted model draws other numbers, so it can never agree with eager."""

    def forward(self, x):
        return x + torch.rand_like(x)


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 8, 8, generator=g)
    scale = torch.rand(batch, 4, generator=g)
    noise = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(2)]
    return (x, scale), {"noise": noise}


def _network(module: nn.Module, store: Path, built: list) -> backends.OpenVinoNetwork:
    def load():
        built.append(1)
        return module.eval()

    return backends.OpenVinoNetwork("nested.v1.pth", "identity 1", load, store)


def _assert_close(expected, got):
    expected_leaves, expected_spec = torch.utils._pytree.tree_flatten(expected)
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    assert got_spec == expected_spec
    for e, g in zip(expected_leaves, got_leaves, strict=True):
        assert isinstance(g, torch.Tensor) and g.shape == e.shape
        assert compare(e, g).passed


def test_the_wrapper_keeps_the_call_and_outputs_of_the_module_for_any_batch(tmp_path):
    torch.manual_seed(0)
    module, built = Nested().eval(), []
    network = _network(module, tmp_path, built)
    for batch in (3, 5, 1):
        args, kwargs = _inputs(batch, seed=batch)
        with torch.inference_mode():
            _assert_close(module(*args, **kwargs), network(*args, **kwargs))
    # one conversion (the batch is dynamic), and the torch module let go once its model was compiled
    (xml,) = tmp_path.glob("*.xml")
    assert xml.name.startswith("nested.v1-") and xml.with_suffix(".bin").is_file()  # a dotted name kept whole
    assert network._eager is None and built == [1]
    assert not list(tmp_path.glob(".convert-*"))  # the conversion's scratch folder is gone
    verdict = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert verdict["adopted"] and not verdict["per_item"]
    # another input signature (here: one noise map fewer) is another model
    args, kwargs = _inputs(2)
    kwargs["noise"] = kwargs["noise"][:1]
    with torch.inference_mode():
        _assert_close(module(*args, **kwargs), network(*args, **kwargs))
    assert len(list(tmp_path.glob("*.xml"))) == 2


def test_a_fresh_process_loads_the_stored_model_without_building_the_network(tmp_path):
    torch.manual_seed(0)
    module, built = Nested().eval(), []
    args, kwargs = _inputs(2)
    with torch.inference_mode():
        expected = module(*args, **kwargs)
        _network(module, tmp_path / "store", built)(*args, **kwargs)
    torch.save((args, kwargs, expected), tmp_path / "io.pt")
    script = f"""
import torch
from pathlib import Path
from retalk.engines import backends
from retalk.selftest import COMPACT_GOLDEN, compare, run_selftest
def load():
    raise AssertionError("the network was built: the stored model was not used")
network = backends.OpenVinoNetwork("nested.v1.pth", "identity 1", load, Path({str(tmp_path / "store")!r}))
args, kwargs, expected = torch.load({str(tmp_path / "io.pt")!r})
got = network(*args, **kwargs)
assert all(compare(expected[k], got[k]).passed for k in ("image",))
assert all(compare(e, g).passed for e, g in zip(expected["parts"], got["parts"]))
print("reused")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "reused", done.stderr[-2000:]
    # a changed checkpoint (another identity) is converted afresh
    other = backends.OpenVinoNetwork("nested.v1.pth", "identity 2", lambda: module, tmp_path / "store")
    other(*args, **kwargs)
    assert len(list((tmp_path / "store").glob("*.xml"))) == 2


def test_a_model_that_disagrees_with_eager_stays_on_torch_and_the_verdict_is_kept(tmp_path, monkeypatch):
    built = []
    network = _network(Noisy(), tmp_path, built)
    x = torch.zeros(2, 3, 4, 4)
    with torch.inference_mode():
        out = network(x)
        assert ((out >= 0) & (out < 1)).all()
        network(x)
    (signature,) = network.on_torch
    assert "disagrees with eager" in network.on_torch[signature]
    assert not list(tmp_path.glob("*.xml"))
    verdict = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert verdict["adopted"] is False
    # a fresh instance reads the verdict: no conversion is tried again
    monkeypatch.setattr(backends, "export", lambda *a: pytest.fail("converted again"))
    again = _network(Noisy(), tmp_path, built)
    with torch.inference_mode():
        again(x)
    assert again.on_torch == network.on_torch


def test_the_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.choose_backend("auto", cpu, "fp32") == "openvino"
    assert backends.choose_backend("auto", cpu, "bf16") == "torch"
    assert backends.choose_backend("auto", cuda, "fp32") == "torch"
    assert backends.choose_backend("torch", cpu, "fp32") == "torch"
    assert backends.choose_backend("openvino", cpu, "fp32") == "openvino"
    with pytest.raises(InputError, match="--backend openvino runs on the CPU"):
        backends.choose_backend("openvino", cuda, "fp32")
    with pytest.raises(InputError, match="--backend openvino runs fp32"):
        backends.choose_backend("openvino", cpu, "bf16")
    with pytest.raises(InputError, match="expected one of auto, torch, openvino"):
        backends.choose_backend("onnx", cpu, "fp32")
    assert JOB_OPTIONS["backend"].choices == backends.BACKENDS and JOB_OPTIONS["backend"].default == "auto"


def test_auto_says_once_that_openvino_is_missing_and_takes_torch(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_openvino", lambda: None)
    backends._say_once.cache_clear()
    for _ in range(2):
        assert backends.choose_backend("auto", torch.device("cpu"), "fp32") == "torch"
    assert [r.message for r in caplog.records].count(
        "backend: openvino is not installed; the networks run on torch (pip install openvino)"
    ) == 1
    with pytest.raises(InputError, match="openvino is not installed"):
        backends.choose_backend("openvino", torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def ganimation_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    checkpoints.synth(folder, [GANIMATION])
    return folder


def _engine(folder: Path, cache: Path, backend: str) -> NeuralEngine:
    request = RedubRequest(
        video=Path("v.mp4"),
        audio=Path("a.wav"),
        output=Path("o.mp4"),
        checkpoints=folder,
        cache_dir=cache,
        device="cpu",
        backend=backend,
    )
    return NeuralEngine(request)


def test_the_option_reaches_the_engine_and_its_prepare_key(ganimation_files, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # only GANimation's file is here
    monkeypatch.setattr(NeuralEngine, "_file_identity", lambda self, name: name)
    torch_engine = _engine(ganimation_files, tmp_path, "torch")
    openvino_engine = _engine(ganimation_files, tmp_path, "openvino")
    assert isinstance(torch_engine._network(GANIMATION), nn.Module)
    network = openvino_engine._network(GANIMATION)
    assert isinstance(network, backends.OpenVinoNetwork) and network.store == tmp_path / "retalk" / "openvino"
    assert openvino_engine._network(GANIMATION) is network  # one per process
    clip = SimpleNamespace(content_key="pixels", track=SimpleNamespace(digest=lambda: "track"))
    assert torch_engine._prepare_key(clip) != openvino_engine._prepare_key(clip)
    assert _engine(ganimation_files, tmp_path, "auto")._prepare_key(clip) == openvino_engine._prepare_key(
        clip
    )


def test_ganimation_through_the_engine_runs_on_openvino_within_the_fp32_rule(
    ganimation_files, tmp_path, monkeypatch
):
    """A real network of the engine (the smallest: GANimation) on synthetic weights, as the engine calls it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    eager = _engine(ganimation_files, tmp_path, "torch")._network(GANIMATION)
    network = _engine(ganimation_files, tmp_path, "openvino")._network(GANIMATION)
    g = torch.Generator().manual_seed(3)
    for batch in (2, 3):
        faces, aus = torch.rand(batch, 3, 128, 128, generator=g) * 2 - 1, torch.rand(batch, 17, generator=g)
        with torch.inference_mode():
            expected, got = eager(faces, aus), network(faces, aus)
        assert isinstance(got, tuple) and len(got) == 3
        for e, o in zip(expected, got, strict=True):
            row = compare(e, o)
            assert row.passed, row
    assert not network.on_torch and network._eager is None
    assert np.isfinite(got[0].numpy()).all()


def test_a_released_network_frees_its_model_and_compiles_the_stored_one_on_its_next_call(
    ganimation_files, tmp_path, monkeypatch
):
    """What the engine does with prepare's networks before the render: their memory goes, not their store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = _engine(ganimation_files, tmp_path, "openvino")
    network = engine._network(GANIMATION)
    faces, aus = torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 17)
    with torch.inference_mode():
        before = network(faces, aus)
    assert network._models
    engine._release([GANIMATION])
    assert not network._models and network._eager is None
    monkeypatch.setattr(backends, "export", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(network, "_load", lambda: pytest.fail("the torch network was built again"))
    with torch.inference_mode():
        after = network(faces, aus)
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    # the torch backend keeps its modules (checkpoints.load's cache)
    torch_engine = _engine(ganimation_files, tmp_path, "torch")
    module = torch_engine._network(GANIMATION)
    torch_engine._release([GANIMATION])
    assert torch_engine._network(GANIMATION) is module


def test_selftest_backend_openvino_checks_the_converted_network_against_the_golden_outputs(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    shutil.copy(COMPACT_GOLDEN / "GANimation_gen.npz", golden)
    rows = run_selftest(golden, tmp_path / "checkpoints", "cpu", backend="openvino")
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    (verdict,) = (tmp_path / "checkpoints" / "openvino").glob("*.json")
    assert json.loads(verdict.read_text())["adopted"]

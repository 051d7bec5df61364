"""Shared fixtures: the shared verification data ($RETALK_SHARED), and media the tests make themselves.

Tests that need the shared data skip with the reason when it is absent; everything else makes its own data.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from retalk.shared import shared_dir

if TYPE_CHECKING:
    import numpy as np
    import torch

    from retalk.selftest.cases import Case

SHARED = shared_dir()


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the shared reference data; set RETALK_SHARED to its folder "
            "(tools/test.sh sets it to ../shared beside the checkout when that exists)"
        )
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """$RETALK_SHARED/reference: manifests, detweights.py, golden outputs, timings."""
    return _shared_path("reference")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _shared_path("reference", "golden")


@pytest.fixture(scope="session")
def golden_functions(golden_dir: Path) -> dict:
    """Every array of golden/functions.npz (the reference's non-network functions), by key."""
    import numpy as np

    with np.load(golden_dir / "functions.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """$RETALK_SHARED/media: face1.mp4 (1350/61 fps), face2.mp4 (25 fps), speech1.wav."""
    return _shared_path("media")


@pytest.fixture(scope="session")
def reference_manifest(reference_dir: Path) -> Callable[[str], dict]:
    """``reference_manifest(checkpoint_name)``: manifests/<checkpoint_name>.json (entries, fill_sha256)."""

    def load(checkpoint_name: str) -> dict:
        return json.loads((reference_dir / "manifests" / f"{checkpoint_name}.json").read_text())

    return load


@pytest.fixture(scope="session")
def reference_state_dict(
    reference_dir: Path, reference_manifest: Callable[[str], dict]
) -> Callable[[str], dict[str, torch.Tensor]]:
    """``reference_state_dict(checkpoint_name)``: the official-key state dict filled by the reference's weight rule
    (detweights.py of the shared reference data), checked against the manifest's fill sha256. Built anew on every call."""
    spec = importlib.util.spec_from_file_location("detweights", reference_dir / "detweights.py")
    detweights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(detweights)

    def build(checkpoint_name: str) -> dict[str, torch.Tensor]:
        manifest = reference_manifest(checkpoint_name)
        state_dict = detweights.deterministic_state_dict(manifest["entries"])
        fill = detweights.state_dict_sha256(state_dict)
        assert fill == manifest["fill_sha256"], (
            f"{checkpoint_name}: the weight rule's fill sha256 {fill} is not the manifest's "
            f"{manifest['fill_sha256']} (torch version or detweights.py changed?)"
        )
        return state_dict

    return build


@pytest.fixture(scope="session")
def reference_shaped_state_dict(
    reference_manifest: Callable[[str], dict],
) -> Callable[[str], dict[str, torch.Tensor]]:
    """``reference_shaped_state_dict(checkpoint_name)``: every official key with its shape and dtype, all ones as
    stride-0 views (a tiny file), to build missing-key, wrong and truncated files. A new dict on every call."""
    import torch

    def build(checkpoint_name: str) -> dict[str, torch.Tensor]:
        return {
            key: torch.ones((), dtype=getattr(torch, dtype)).expand(shape)
            for key, shape, dtype, *_ in reference_manifest(checkpoint_name)["entries"]
        }

    return build


@pytest.fixture(scope="module")
def shaped_sd(
    request: pytest.FixtureRequest, reference_shaped_state_dict: Callable[[str], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """:func:`reference_shaped_state_dict` of the official file the test module names as ``CHECKPOINT``."""
    return reference_shaped_state_dict(request.module.CHECKPOINT)


@pytest.fixture(scope="session")
def golden_case(golden_dir: Path) -> Callable[[Case, Path], Mapping[str, np.ndarray]]:
    """``golden_case(case, checkpoints)``: runs a ``retalk.selftest.cases`` row on its golden file with the
    checkpoint files in ``checkpoints`` (CPU), asserts that it returns exactly the golden outputs, each within
    ``retalk.selftest.compare`` of the row's tolerance (the README rule unless the row overrides it), and
    returns the golden arrays."""
    import numpy as np
    import torch

    from retalk.selftest import compare

    def check(case: Case, checkpoints: Path) -> Mapping[str, np.ndarray]:
        golden = np.load(golden_dir / case.golden)
        inputs = {k: golden[k] for k in golden.files if k.startswith("in.")}
        outputs = case.run(inputs, json.loads(str(golden["meta"])), checkpoints, torch.device("cpu"))
        assert set(outputs) == {k.removeprefix("out.") for k in golden.files if k.startswith("out.")}
        for name, got in outputs.items():
            row = compare(golden[f"out.{name}"], got, case.tolerances.get(name), output=name)
            assert row.passed, row
        return golden

    return check


@pytest.fixture(scope="session")
def randomize_weights() -> Callable[[torch.nn.Module, int], torch.nn.Module]:
    """``randomize_weights(module, seed)``: every parameter filled with fan-in scaled normals (constructors leave
    many at zero); returns the module in eval mode."""
    import torch

    def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in module.parameters():
                draw = torch.randn(param.shape, generator=generator)
                fan_in = math.prod(param.shape[1:]) if param.ndim >= 2 else 1
                if param.ndim == 5:  # modulated conv weight [1, O, I, k, k]
                    fan_in = math.prod(param.shape[2:])
                param.copy_(draw / math.sqrt(fan_in) if param.ndim >= 2 else 1 + 0.3 * draw)
        return module.eval()

    return randomize

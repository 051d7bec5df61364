"""The checkpoints package: compact data vs the manifests, search folders, verify, synth, load, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import scipy.io
import torch

from retalk import checkpoints
from retalk.checkpoints import catalogue
from retalk.checkpoints.catalogue import (
    BFM_LANDMARKS,
    DLIB_LANDMARKS,
    DNET,
    ENET,
    EXPRESSION,
    FACE3D,
    FAN,
    GANIMATION,
    GFPGAN,
    GPEN,
    LNET,
    PARSENET,
    RETINAFACE,
    S3FD,
)
from retalk.cli import main
from retalk.errors import CheckpointError
from retalk.models.checkpoint import build_checked
from retalk.synthetic import deterministic_state_dict


@pytest.fixture(autouse=True)
def isolated_search(monkeypatch, tmp_path):
    """No user cache or $RETALK_CHECKPOINTS from the machine leaks into a test."""
    monkeypatch.delenv(checkpoints.ENV_VAR, raising=False)
    monkeypatch.setattr(catalogue, "default_checkpoints_dir", lambda: tmp_path / "user-cache")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """Every PyTorch and .mat stand-in (the FAN archive has its own writer and test in test_fan.py)."""
    dest = tmp_path_factory.mktemp("synth")
    checkpoints.synth(dest, [n for n, s in checkpoints.CHECKPOINTS.items() if s.kind in ("torch", "mat")])
    return dest


def test_compact_data_matches_the_manifests(reference_dir):
    manifests = {
        p.name.removesuffix(".json"): json.loads(p.read_text())
        for p in (reference_dir / "manifests").glob("*.json")
    }
    torch_specs = {s.name for s in checkpoints.CHECKPOINTS.values() if s.kind == "torch"}
    assert torch_specs == set(manifests)
    for name, manifest in manifests.items():
        spec = checkpoints.CHECKPOINTS[name]
        assert spec.entries == manifest["entries"], name
        assert spec.fill_sha256 == manifest["fill_sha256"], name
        top = manifest["container"]["top_level_key"]
        if top is None:
            assert spec.container.top_level == (), name
        else:  # e.g. "params_ema (fallback 'params')" or "optional 'state_dict'"
            assert all(k in top for k in spec.container.top_level) and spec.container.top_level, name
            assert spec.container.top_level_optional == top.startswith("optional"), name
        assert spec.container.extra_keys_allowed == (manifest["strict"] is not True), name


def test_synth_writes_official_layouts_that_verify_ok(synth_dir):
    lnet = torch.load(synth_dir / LNET, map_location="cpu", weights_only=True, mmap=True)
    assert list(lnet) == ["state_dict"]
    assert list(torch.load(synth_dir / GFPGAN, weights_only=True, mmap=True)) == ["params_ema"]
    assert list(torch.load(synth_dir / DNET, weights_only=True, mmap=True)) == ["net_G_ema"]
    assert "body.conv1.weight" in torch.load(synth_dir / RETINAFACE, weights_only=True, mmap=True)
    enet = torch.load(synth_dir / ENET, weights_only=True, mmap=True)["state_dict"]
    assert len(enet) == 64 and not any("low_res" in k for k in enet)
    expression = scipy.io.loadmat(synth_dir / EXPRESSION)
    assert (
        expression["expression_center"].shape == (1, 64)
        and expression["expression_center"].dtype == "float64"
    )
    lm = scipy.io.loadmat(synth_dir / BFM_LANDMARKS)["lm"]
    assert lm.shape == (68, 3) and lm.dtype == "float32"

    results = {r.name: r for r in checkpoints.verify(synth_dir)}
    written = {
        p.relative_to(synth_dir).as_posix()
        for p in synth_dir.rglob("*")
        if p.is_file() and p.name != checkpoints.SYNTH_STAMP
    }
    assert written >= {n for n, s in checkpoints.CHECKPOINTS.items() if s.kind in ("torch", "mat")}
    for name in written:
        assert results[name].status == "ok", results[name].message
    assert results[DLIB_LANDMARKS].status == "not-needed"


def test_synth_skips_current_files_and_rewrites_changed_ones(tmp_path):
    first = checkpoints.synth(tmp_path, [S3FD, EXPRESSION])
    before = {p.name: p.stat().st_mtime_ns for p in first}
    assert checkpoints.synth(tmp_path, [S3FD, EXPRESSION]) == first
    assert {p.name: p.stat().st_mtime_ns for p in first} == before
    (tmp_path / EXPRESSION).write_bytes(b"a real checkpoint, say")
    with pytest.raises(CheckpointError, match="not written by `retalk models synth`"):
        checkpoints.synth(tmp_path, [EXPRESSION])  # never overwrites a file it did not write
    assert (tmp_path / EXPRESSION).read_bytes() == b"a real checkpoint, say"
    (tmp_path / EXPRESSION).unlink()
    checkpoints.synth(tmp_path, [EXPRESSION])
    assert checkpoints.verify_file(tmp_path / EXPRESSION, EXPRESSION).status == "ok"


def test_truncated_file_is_reported(synth_dir, tmp_path):
    data = (synth_dir / S3FD).read_bytes()
    (tmp_path / S3FD).write_bytes(data[: len(data) // 2])
    (result,) = checkpoints.verify(tmp_path, [S3FD])
    assert result.status == "truncated" and not result.ok
    assert S3FD in result.message and "retalk models fetch" in result.message


def test_enet_given_as_lnet_is_named(synth_dir, tmp_path):
    shutil.copy(synth_dir / ENET, tmp_path / LNET)
    (result,) = checkpoints.verify(tmp_path, [LNET])
    assert result.status == "wrong"
    assert f"looks like {ENET}" in result.message


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    spec = checkpoints.CHECKPOINTS[S3FD]
    state = deterministic_state_dict(spec.entries)
    del state["conv3_3_norm.weight"]
    torch.save(state, tmp_path / spec.name)
    result = checkpoints.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "conv3_3_norm.weight" in result.message

    state = deterministic_state_dict(spec.entries)
    state["fc7.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / spec.name)
    result = checkpoints.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "fc7.bias" in result.message


def test_extra_keys_only_where_the_reference_ignores_them(tmp_path):
    # RetinaFace: optional 'state_dict' + leading 'module.' + strict=False, so an extra key is fine
    spec = checkpoints.CHECKPOINTS[RETINAFACE]
    state = {f"module.{k}": v for k, v in deterministic_state_dict(spec.entries).items()}
    torch.save({"state_dict": {**state, "module.extra": torch.zeros(1)}}, tmp_path / spec.name)
    assert checkpoints.verify_file(tmp_path / spec.name, spec.name).status == "ok"
    # s3fd loads strictly: the same extra key is an error
    spec = checkpoints.CHECKPOINTS[S3FD]
    torch.save({**deterministic_state_dict(spec.entries), "extra": torch.zeros(1)}, tmp_path / spec.name)
    result = checkpoints.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "extra" in result.message


def test_container_layout_is_checked(tmp_path):
    spec = checkpoints.CHECKPOINTS[FACE3D]
    torch.save(
        deterministic_state_dict(spec.entries), tmp_path / spec.name
    )  # plain dict, official has 'net_recon'
    result = checkpoints.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "wrong" and "'net_recon'" in result.message


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_check(tmp_path):
    name = FAN
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4)), tmp_path / name)
    assert checkpoints.verify_file(tmp_path / name, name).status == "ok"
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) - 100])
    assert checkpoints.verify_file(tmp_path / name, name).status == "truncated"
    with zipfile.ZipFile(tmp_path / name, "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a TorchScript module")
    assert checkpoints.verify_file(tmp_path / name, name).status == "wrong"


def test_not_a_checkpoint_and_bad_mat(tmp_path):
    (tmp_path / DNET).write_text("<html>404</html>")
    assert checkpoints.verify_file(tmp_path / DNET, DNET).status == "corrupt"
    scipy.io.savemat(tmp_path / EXPRESSION, {"expression_center": torch.zeros(1, 64).double().numpy()})
    result = checkpoints.verify_file(tmp_path / EXPRESSION, EXPRESSION)
    assert result.status == "bad-keys" and "expression_mouth" in result.message


def test_search_order_find_and_missing(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "user-cache"
    for folder in (explicit, env, cache):
        folder.mkdir(exist_ok=True)
    monkeypatch.setenv(checkpoints.ENV_VAR, str(env))
    assert checkpoints.search_dirs(explicit) == [explicit, env, cache]
    (cache / DNET).write_bytes(b"x")
    (env / DNET).write_bytes(b"x")
    assert checkpoints.find_checkpoint(DNET, explicit) == env / DNET
    (explicit / DNET).write_bytes(b"x")
    assert checkpoints.find_checkpoint(DNET, explicit) == explicit / DNET
    with pytest.raises(CheckpointError) as err:
        checkpoints.find_checkpoint(LNET, explicit)
    assert (
        str(explicit) in str(err.value)
        and str(env) in str(err.value)
        and f"retalk models fetch {LNET}" in str(err.value)
    )
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        checkpoints.find_checkpoint("nope.pth")

    missing = checkpoints.missing_checkpoints(explicit)
    assert DNET not in missing and LNET in missing and GANIMATION not in missing
    assert GANIMATION in checkpoints.missing_checkpoints(explicit, upper_face=True)


def test_auto_engine_needs_exactly_the_neural_engines_files(tmp_path, monkeypatch):
    """The neural engine reuses the face track, so the detectors, FAN and BFM are optional downloads."""
    monkeypatch.delenv("RETALK_CHECKPOINTS", raising=False)
    monkeypatch.setattr(catalogue, "default_checkpoints_dir", lambda: tmp_path / "cache")
    assert set(checkpoints.missing_checkpoints(tmp_path)) == {
        LNET,
        ENET,
        DNET,
        FACE3D,
        GFPGAN,
        GPEN,
        PARSENET,
        EXPRESSION,
    }


def test_loaders_named_in_the_catalogue_exist():
    for spec in checkpoints.CHECKPOINTS.values():
        assert callable(checkpoints.resolve_loader(spec)), spec.loader


def test_cli_verify_exit_code_and_lines(synth_dir, tmp_path, capsys):
    for name in (S3FD, GANIMATION):
        shutil.copy(synth_dir / name, tmp_path / name)
    data = (tmp_path / GANIMATION).read_bytes()
    (tmp_path / GANIMATION).write_bytes(data[:1000])
    assert main(["models", "verify", "--checkpoints", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if GANIMATION in line)
    assert line.startswith("truncated")
    assert any(line.startswith("ok") and S3FD in line for line in out.splitlines())
    assert main(["models", "verify", "--checkpoints", str(tmp_path), "--json"]) == 1
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[S3FD]["ok"] and rows[LNET]["status"] == "missing"


def test_cli_list_and_synth(tmp_path, capsys):
    assert main(["models", "synth", str(tmp_path / "out"), EXPRESSION, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paths"] == [str(tmp_path / "out" / EXPRESSION)]
    assert main(["models", "list", "--checkpoints", str(tmp_path / "out"), "--json"]) == 0
    listing = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listing[EXPRESSION]["path"] == str(tmp_path / "out" / EXPRESSION)
    assert listing[LNET]["path"] is None and listing[LNET]["url"].endswith(f"/v0.0.1/{LNET}")
    assert os.path.exists(tmp_path / "out" / checkpoints.SYNTH_STAMP)


def test_training_state_beside_the_weights_verifies_ok(tmp_path, reference_shaped_state_dict):
    import argparse

    import numpy as np

    name = FACE3D
    content = {
        "net_recon": reference_shaped_state_dict(name),
        "epoch": np.int64(20),
        "opt": argparse.Namespace(lr=1e-4),
    }
    torch.save(content, tmp_path / name)
    result = checkpoints.verify_file(tmp_path / name, name)
    assert result.status == "ok", result.message


def test_synthetic_stand_ins_are_told_from_other_files(synth_dir, tmp_path):
    name = S3FD
    assert checkpoints.is_synthetic(synth_dir / name, name)
    shutil.copy(synth_dir / name, tmp_path / name)  # the same bytes, not written by synth here
    assert not checkpoints.is_synthetic(tmp_path / name, name)
    assert checkpoints.is_synthetic(synth_dir / BFM_LANDMARKS, BFM_LANDMARKS)


# --- loading ---------------------------------------------------------------------------------------------------


def test_load_builds_a_network_once_per_file_identity(synth_dir, tmp_path):
    shutil.copy(synth_dir / GANIMATION, tmp_path / GANIMATION)
    first = checkpoints.load(GANIMATION, tmp_path)
    assert checkpoints.load(GANIMATION, tmp_path) is first  # a render server's workers keep it warm
    assert not first.training and {p.device.type for p in first.parameters()} == {"cpu"}
    stat = (tmp_path / GANIMATION).stat()
    os.utime(tmp_path / GANIMATION, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # replaced
    again = checkpoints.load(GANIMATION, tmp_path)
    assert again is not first
    for (key, value), (_, other) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(value, other), key


def test_load_finds_every_file_a_loader_reads(synth_dir, tmp_path):
    shutil.copy(synth_dir / ENET, tmp_path / ENET)
    assert checkpoints.get_spec(ENET).files == (ENET, LNET)
    with pytest.raises(CheckpointError, match=f"{LNET} not found in {tmp_path}"):
        checkpoints.load(ENET, tmp_path)
    with pytest.raises(ValueError, match="not a network"):
        checkpoints.load(EXPRESSION, synth_dir)


def test_build_checked_fills_a_module_built_without_weights():
    state = {"weight": torch.arange(6.0).reshape(2, 3, 1, 1), "bias": torch.tensor([0.5, -0.5])}
    model, report = build_checked(lambda: torch.nn.Conv2d(3, 2, 1), state, lambda sd, _: sd, name="conv")
    assert report.clean and not model.training
    assert torch.equal(model.weight, state["weight"]) and torch.equal(model.bias, state["bias"])
    assert model.weight.data_ptr() != state["weight"].data_ptr()  # a copy: the file may change under a server
    with pytest.raises(CheckpointError, match=r"conv: 1 missing key\(s\): bias"):
        build_checked(
            lambda: torch.nn.Conv2d(3, 2, 1), {"weight": state["weight"]}, lambda sd, _: sd, name="conv"
        )


def test_build_checked_refuses_tensors_no_checkpoint_fills():
    class WithScratch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.register_buffer("scratch", torch.zeros(1), persistent=False)

    state = {"conv.weight": torch.ones(1, 1, 1, 1), "conv.bias": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="scratch"):
        build_checked(WithScratch, state, lambda sd, _: sd, name="scratch")

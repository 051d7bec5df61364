"""The checkpoint registry: compact data vs the manifests, search folders, verify, synth, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import scipy.io
import torch

from retalk import registry
from retalk.cli import main
from retalk.errors import CheckpointError
from retalk.synthetic import deterministic_state_dict


@pytest.fixture(autouse=True)
def isolated_search(monkeypatch, tmp_path):
    """No user cache or $RETALK_CHECKPOINTS from the machine leaks into a test."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "default_checkpoints_dir", lambda: tmp_path / "user-cache")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """Every PyTorch and .mat stand-in (the FAN archive has its own writer and test in test_fan.py)."""
    dest = tmp_path_factory.mktemp("synth")
    registry.synth(dest, [n for n, s in registry.CHECKPOINTS.items() if s.kind in ("torch", "mat")])
    return dest


def test_compact_data_matches_the_manifests(reference_dir):
    manifests = {
        p.name.removesuffix(".json"): json.loads(p.read_text())
        for p in (reference_dir / "manifests").glob("*.json")
    }
    torch_specs = {s.name for s in registry.CHECKPOINTS.values() if s.kind == "torch"}
    assert torch_specs == set(manifests)
    for name, manifest in manifests.items():
        spec = registry.CHECKPOINTS[name]
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
    lnet = torch.load(synth_dir / "LNet.pth", map_location="cpu", weights_only=True, mmap=True)
    assert list(lnet) == ["state_dict"]
    assert list(torch.load(synth_dir / "GFPGANv1.3.pth", weights_only=True, mmap=True)) == ["params_ema"]
    assert list(torch.load(synth_dir / "DNet.pt", weights_only=True, mmap=True)) == ["net_G_ema"]
    assert "body.conv1.weight" in torch.load(synth_dir / "RetinaFace-R50.pth", weights_only=True, mmap=True)
    enet = torch.load(synth_dir / "ENet.pth", weights_only=True, mmap=True)["state_dict"]
    assert len(enet) == 64 and not any("low_res" in k for k in enet)
    expression = scipy.io.loadmat(synth_dir / "expression.mat")
    assert (
        expression["expression_center"].shape == (1, 64)
        and expression["expression_center"].dtype == "float64"
    )
    lm = scipy.io.loadmat(synth_dir / "BFM" / "similarity_Lm3D_all.mat")["lm"]
    assert lm.shape == (68, 3) and lm.dtype == "float32"

    results = {r.name: r for r in registry.verify(synth_dir)}
    written = {
        p.relative_to(synth_dir).as_posix()
        for p in synth_dir.rglob("*")
        if p.is_file() and p.name != registry.SYNTH_STAMP
    }
    assert written >= {n for n, s in registry.CHECKPOINTS.items() if s.kind in ("torch", "mat")}
    for name in written:
        assert results[name].status == "ok", results[name].message
    assert results["shape_predictor_68_face_landmarks.dat"].status == "not-needed"


def test_synth_skips_current_files_and_rewrites_changed_ones(tmp_path):
    first = registry.synth(tmp_path, ["s3fd-619a316812.pth", "expression.mat"])
    before = {p.name: p.stat().st_mtime_ns for p in first}
    assert registry.synth(tmp_path, ["s3fd-619a316812.pth", "expression.mat"]) == first
    assert {p.name: p.stat().st_mtime_ns for p in first} == before
    (tmp_path / "expression.mat").write_bytes(b"a real checkpoint, say")
    with pytest.raises(CheckpointError, match="not written by `retalk models synth`"):
        registry.synth(tmp_path, ["expression.mat"])  # never overwrites a file it did not write
    assert (tmp_path / "expression.mat").read_bytes() == b"a real checkpoint, say"
    (tmp_path / "expression.mat").unlink()
    registry.synth(tmp_path, ["expression.mat"])
    assert registry.verify_file(tmp_path / "expression.mat", "expression.mat").status == "ok"


def test_truncated_file_is_reported(synth_dir, tmp_path):
    data = (synth_dir / "s3fd-619a316812.pth").read_bytes()
    (tmp_path / "s3fd-619a316812.pth").write_bytes(data[: len(data) // 2])
    (result,) = registry.verify(tmp_path, ["s3fd-619a316812.pth"])
    assert result.status == "truncated" and not result.ok
    assert "s3fd-619a316812.pth" in result.message and "retalk models fetch" in result.message


def test_enet_given_as_lnet_is_named(synth_dir, tmp_path):
    shutil.copy(synth_dir / "ENet.pth", tmp_path / "LNet.pth")
    (result,) = registry.verify(tmp_path, ["LNet.pth"])
    assert result.status == "wrong"
    assert "looks like ENet.pth" in result.message


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    spec = registry.CHECKPOINTS["s3fd-619a316812.pth"]
    state = deterministic_state_dict(spec.entries)
    del state["conv3_3_norm.weight"]
    torch.save(state, tmp_path / spec.name)
    result = registry.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "conv3_3_norm.weight" in result.message

    state = deterministic_state_dict(spec.entries)
    state["fc7.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / spec.name)
    result = registry.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "fc7.bias" in result.message


def test_extra_keys_only_where_the_reference_ignores_them(tmp_path):
    # RetinaFace: optional 'state_dict' + leading 'module.' + strict=False, so an extra key is fine
    spec = registry.CHECKPOINTS["RetinaFace-R50.pth"]
    state = {f"module.{k}": v for k, v in deterministic_state_dict(spec.entries).items()}
    torch.save({"state_dict": {**state, "module.extra": torch.zeros(1)}}, tmp_path / spec.name)
    assert registry.verify_file(tmp_path / spec.name, spec.name).status == "ok"
    # s3fd loads strictly: the same extra key is an error
    spec = registry.CHECKPOINTS["s3fd-619a316812.pth"]
    torch.save({**deterministic_state_dict(spec.entries), "extra": torch.zeros(1)}, tmp_path / spec.name)
    result = registry.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "bad-keys" and "extra" in result.message


def test_container_layout_is_checked(tmp_path):
    spec = registry.CHECKPOINTS["face3d_pretrain_epoch_20.pth"]
    torch.save(
        deterministic_state_dict(spec.entries), tmp_path / spec.name
    )  # plain dict, official has 'net_recon'
    result = registry.verify_file(tmp_path / spec.name, spec.name)
    assert result.status == "wrong" and "'net_recon'" in result.message


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_check(tmp_path):
    name = "2DFAN4-cd938726ad.zip"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4)), tmp_path / name)
    assert registry.verify_file(tmp_path / name, name).status == "ok"
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) - 100])
    assert registry.verify_file(tmp_path / name, name).status == "truncated"
    with zipfile.ZipFile(tmp_path / name, "w") as archive:
        archive.writestr("readme.txt", "a zip, but not a TorchScript module")
    assert registry.verify_file(tmp_path / name, name).status == "wrong"


def test_not_a_checkpoint_and_bad_mat(tmp_path):
    (tmp_path / "DNet.pt").write_text("<html>404</html>")
    assert registry.verify_file(tmp_path / "DNet.pt", "DNet.pt").status == "corrupt"
    scipy.io.savemat(tmp_path / "expression.mat", {"expression_center": torch.zeros(1, 64).double().numpy()})
    result = registry.verify_file(tmp_path / "expression.mat", "expression.mat")
    assert result.status == "bad-keys" and "expression_mouth" in result.message


def test_search_order_find_and_missing(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "user-cache"
    for folder in (explicit, env, cache):
        folder.mkdir(exist_ok=True)
    monkeypatch.setenv(registry.ENV_VAR, str(env))
    assert registry.search_dirs(explicit) == [explicit, env, cache]
    (cache / "DNet.pt").write_bytes(b"x")
    (env / "DNet.pt").write_bytes(b"x")
    assert registry.find_checkpoint("DNet.pt", explicit) == env / "DNet.pt"
    (explicit / "DNet.pt").write_bytes(b"x")
    assert registry.find_checkpoint("DNet.pt", explicit) == explicit / "DNet.pt"
    with pytest.raises(CheckpointError) as err:
        registry.find_checkpoint("LNet.pth", explicit)
    assert (
        str(explicit) in str(err.value)
        and str(env) in str(err.value)
        and "retalk models fetch LNet.pth" in str(err.value)
    )
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        registry.find_checkpoint("nope.pth")

    missing = registry.missing_checkpoints(explicit)
    assert "DNet.pt" not in missing and "LNet.pth" in missing and "30_net_gen.pth" not in missing
    assert "30_net_gen.pth" in registry.missing_checkpoints(explicit, upper_face=True)


def test_auto_engine_needs_exactly_the_neural_engines_files(tmp_path, monkeypatch):
    """The neural engine reuses the face track, so the detectors, FAN and BFM are optional downloads."""
    monkeypatch.delenv("RETALK_CHECKPOINTS", raising=False)
    monkeypatch.setattr(registry, "default_checkpoints_dir", lambda: tmp_path / "cache")
    assert set(registry.missing_checkpoints(tmp_path)) == {
        "LNet.pth",
        "ENet.pth",
        "DNet.pt",
        "face3d_pretrain_epoch_20.pth",
        "GFPGANv1.3.pth",
        "GPEN-BFR-512.pth",
        "ParseNet-latest.pth",
        "expression.mat",
    }


def test_loaders_named_in_the_registry_exist():
    for spec in registry.CHECKPOINTS.values():
        assert callable(registry.resolve_loader(spec)), spec.loader


def test_cli_verify_exit_code_and_lines(synth_dir, tmp_path, capsys):
    for name in ("s3fd-619a316812.pth", "30_net_gen.pth"):
        shutil.copy(synth_dir / name, tmp_path / name)
    data = (tmp_path / "30_net_gen.pth").read_bytes()
    (tmp_path / "30_net_gen.pth").write_bytes(data[:1000])
    assert main(["models", "verify", "--checkpoints", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "30_net_gen.pth" in line)
    assert line.startswith("truncated")
    assert any(line.startswith("ok") and "s3fd-619a316812.pth" in line for line in out.splitlines())
    assert main(["models", "verify", "--checkpoints", str(tmp_path), "--json"]) == 1
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["s3fd-619a316812.pth"]["ok"] and rows["LNet.pth"]["status"] == "missing"


def test_cli_list_and_synth(tmp_path, capsys):
    assert main(["models", "synth", str(tmp_path / "out"), "expression.mat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["paths"] == [str(tmp_path / "out" / "expression.mat")]
    assert main(["models", "list", "--checkpoints", str(tmp_path / "out"), "--json"]) == 0
    listing = {r["name"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert listing["expression.mat"]["path"] == str(tmp_path / "out" / "expression.mat")
    assert listing["LNet.pth"]["path"] is None and listing["LNet.pth"]["url"].endswith("/v0.0.1/LNet.pth")
    assert os.path.exists(tmp_path / "out" / registry.SYNTH_STAMP)


def test_training_state_beside_the_weights_verifies_ok(tmp_path, reference_shaped_state_dict):
    import argparse

    import numpy as np

    name = "face3d_pretrain_epoch_20.pth"
    content = {
        "net_recon": reference_shaped_state_dict(name),
        "epoch": np.int64(20),
        "opt": argparse.Namespace(lr=1e-4),
    }
    torch.save(content, tmp_path / name)
    result = registry.verify_file(tmp_path / name, name)
    assert result.status == "ok", result.message


def test_synthetic_stand_ins_are_told_from_other_files(synth_dir, tmp_path):
    name = "s3fd-619a316812.pth"
    assert registry.is_synthetic(synth_dir / name, name)
    shutil.copy(synth_dir / name, tmp_path / name)  # the same bytes, not written by synth here
    assert not registry.is_synthetic(tmp_path / name, name)
    assert registry.is_synthetic(synth_dir / "BFM" / "similarity_Lm3D_all.mat", "BFM/similarity_Lm3D_all.mat")

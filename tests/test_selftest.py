"""The selftest runner: comparison rules, the case table, rows for every failure, the compact golden set shipped
with retalk (cut from the reference's golden files), the temporary weights folder and the CLI exit code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import retalk.selftest as selftest
from retalk.cli import main
from retalk.selftest import COMPACT_GOLDEN, compact_slices, compare, load_golden, run_selftest
from retalk.selftest.cases import CASES, Case


def test_default_rule_accepts_float32_noise_and_rejects_real_errors():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 3, 256, 256)).astype(np.float32)
    assert compare(ref, ref.copy()).passed
    close = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-6
    row = compare(ref, close)
    assert row.passed and 0 < row.rel_l2 < 1e-5 and 0 < row.max_abs < 1e-5
    perturbed = ref * 1.01
    row = compare(ref, perturbed)
    assert not row.passed and row.rel_l2 == pytest.approx(0.01, rel=1e-3)
    spike = ref.copy()
    spike[0, 0, 0, 0] += 0.01 * np.abs(ref).max()  # tiny in rel L2, a local blow-up in max abs
    row = compare(ref, spike)
    assert row.rel_l2 < 1e-4 and not row.passed
    assert not compare(ref, ref[:, ::-1]).passed  # swapped channels
    assert not compare(ref, ref[0]).passed and "shape" in compare(ref, ref[0]).detail
    nan = ref.copy()
    nan[0, 0, 0, 0] = np.nan
    assert not compare(ref, nan).passed


def test_tolerance_overrides():
    labels = np.zeros(10_000, dtype=np.uint8)
    flipped = labels.copy()
    flipped[:5] = 1
    assert compare(labels, flipped, {"min_equal": 0.999}).passed
    flipped[:20] = 1
    assert not compare(labels, flipped, {"min_equal": 0.999}).passed
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert compare(image, image + 1, {"max_grey": 1}).passed
    assert not compare(image, image + 2, {"max_grey": 1}).passed
    assert compare(image, image, {"exact": True}).passed
    assert not compare(image, image + 1, {"exact": True}).passed
    values = np.array([1.0, 1e6])
    assert compare(values, values * (1 + 5e-10), {"rtol": 1e-9}).passed
    assert not compare(values, values * (1 + 5e-9), {"rtol": 1e-9}).passed
    assert compare(values, values + 5e-4, {"atol": 1e-3}).passed
    assert not compare(values, values + 5e-3, {"atol": 1e-3}).passed


def _case(golden: str, run, tolerances=None) -> Case:
    def checked(inputs, meta, folder, device, backend):
        assert meta["seed"] == 7 and folder.is_dir()
        return run(inputs)

    return Case(golden, (), checked, tolerances or {})


def _golden(folder, name, meta=None, **arrays):
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, meta=np.array(json.dumps({"seed": 7, **(meta or {})})), **arrays)


def test_runner_rows_for_pass_fail_missing_and_errors(tmp_path):
    golden = tmp_path / "golden"
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    for name in ("Good", "Bad", "Broken", "Orphan", "Cheat"):
        _golden(golden, f"{name}.npz", **{"in.x": x, "out.y": 2 * x})
    _golden(golden, "Partial.npz", **{"in.x": x, "out.y": 2 * x, "out.w": x})

    def broken(inputs):
        raise RuntimeError("boom")

    cases = {
        "Good.npz": _case("Good.npz", lambda g: {"y": 2 * g["in.x"]}),
        "Bad.npz": _case("Bad.npz", lambda g: {"y": 2.1 * g["in.x"]}),
        "Broken.npz": _case("Broken.npz", broken),
        "Partial.npz": _case("Partial.npz", lambda g: {"y": 2 * g["in.x"]}),
        "Cheat.npz": _case("Cheat.npz", lambda g: {"y": g["out.y"]}),
    }
    rows = run_selftest(golden, tmp_path / "ckpt", "cpu", cases=cases)
    by_key = {(r.network, r.output): r for r in rows}
    assert by_key[("Good", "y")].passed and by_key[("Good", "y")].max_abs == 0.0
    assert not by_key[("Bad", "y")].passed and by_key[("Bad", "y")].rel_l2 == pytest.approx(0.05, rel=1e-4)
    assert not by_key[("Broken", "-")].passed and "boom" in by_key[("Broken", "-")].detail
    assert not by_key[("Orphan", "-")].passed and "no selftest case" in by_key[("Orphan", "-")].detail
    assert by_key[("Partial", "y")].passed and not by_key[("Partial", "w")].passed
    assert not by_key[("Cheat", "-")].passed  # cases get the inputs, never the golden outputs


def test_functions_style_golden_uses_full_keys_and_tolerances(tmp_path):
    golden = tmp_path / "golden"
    _golden(golden, "functions.npz", **{"a.in": np.arange(5.0), "a.out": np.arange(5.0) * 3})
    case = _case("functions.npz", lambda g: {"a.out": g["a.in"] * 3 + 1e-7}, {"a.out": {"atol": 1e-6}})
    (row,) = run_selftest(golden, tmp_path / "ckpt", "cpu", cases={"functions.npz": case})
    assert (row.network, row.output, row.passed) == ("functions", "a.out", True)
    assert "1e-06" in row.detail


def test_compact_files_compare_the_slices_they_keep(tmp_path):
    """A compact file keeps a strided grid of an output: the case's full output is cut the same way."""
    golden = tmp_path / "golden"
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)
    every_2nd = [[None, None, None], [None, None, None], [None, None, 2], [None, None, 2]]
    meta = {"compact": {"select": {"y": every_2nd}}}
    _golden(golden, "Net.npz", meta, **{"in.x": x, "out.y": np.ascontiguousarray((3 * x)[:, :, ::2, ::2])})
    exact = _case("Net.npz", lambda g: {"y": 3 * g["in.x"]})
    assert all(r.passed for r in run_selftest(golden, tmp_path / "c", "cpu", cases={"Net.npz": exact}))

    def wrong_on_the_grid(g):
        y = 3 * g["in.x"]
        y[0, 1, 4, 6] += 1.0  # a kept position
        return {"y": y}

    wrong = _case("Net.npz", wrong_on_the_grid)
    assert not any(r.passed for r in run_selftest(golden, tmp_path / "c", "cpu", cases={"Net.npz": wrong}))


def test_codes_into_distinct_values_decode_bit_for_bit(tmp_path):
    image = np.array([[0.0, -0.0, 1 / 255], [1.0, 1 / 255, 0.5]], dtype=np.float32)
    bits, codes = np.unique(image.view(np.uint32), return_inverse=True)
    np.savez(
        tmp_path / "x.npz",
        **{"in.x#codes": codes.reshape(image.shape).astype(np.uint8)},
        **{"in.x#values": bits.view(np.float32)},
    )
    arrays, _ = load_golden(tmp_path / "x.npz")
    assert list(arrays) == ["in.x"] and arrays["in.x"].tobytes() == image.tobytes()  # -0.0 stays -0.0


def test_cli_prints_its_needs_up_front_and_removes_its_weights(tmp_path, monkeypatch, capsys):
    golden = tmp_path / "golden"
    x = np.ones((2, 3), dtype=np.float32)
    _golden(golden, "LNet.npz", **{"in.x": x, "out.y": x * 3})
    folders = []

    def run(inputs, meta, folder, device, backend):
        assert backend == "torch"  # the selftest checks the torch networks unless --backend says otherwise
        folders.append(folder)
        assert (folder / "LNet.pth").is_file()  # the runner wrote the synthetic weights first
        return {"y": inputs["in.x"] * 3}

    monkeypatch.setattr(selftest, "CASES", {"LNet.npz": Case("LNet.npz", ("LNet.pth",), run)})
    argv = ["selftest", "--golden", str(golden), "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "LNet" in captured.out and "PASS" in captured.out and "FAIL" not in captured.out
    first = captured.err.splitlines()[0]
    assert "0.5 GB" in first and "temporary folder" in first and "about 1 min" in first  # LNet.pth
    assert not folders[0].exists()

    assert main([*argv, "--keep", str(tmp_path / "kept")]) == 0
    assert folders[1] == tmp_path / "kept" and (tmp_path / "kept" / "LNet.pth").is_file()
    assert str(tmp_path / "kept") in capsys.readouterr().err.splitlines()[0]

    _golden(golden, "Other.npz", **{"in.x": x, "out.y": x})
    assert main(argv) == 1
    assert "no selftest case for Other.npz" in capsys.readouterr().out


def test_cli_missing_golden_dir_is_one_line(tmp_path, capsys):
    assert main(["selftest", "--golden", str(tmp_path / "absent"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retalk: error: --golden") and "absent" in err and "\n" not in err


def test_the_compact_set_has_a_case_for_every_file_and_a_file_for_every_case():
    files = sorted(p.name for p in COMPACT_GOLDEN.glob("*.npz"))
    assert files == sorted(CASES)
    assert sum(p.stat().st_size for p in COMPACT_GOLDEN.glob("*.npz")) < 8e6  # a few MB in the package


@pytest.mark.golden
@pytest.mark.parametrize("name", sorted(CASES))
def test_compact_set_is_cut_from_the_reference_golden_files(golden_dir, name):
    """Every array of a compact file is the reference's own: batch item 0, the recorded slices of an output."""
    compact, meta = load_golden(COMPACT_GOLDEN / name)
    provenance = meta["compact"]
    assert provenance["source"] == name
    assert provenance["source_sha256"] == hashlib.sha256((golden_dir / name).read_bytes()).hexdigest()
    full, _ = load_golden(golden_dir / name)
    is_network = provenance["batch_items"] == [0]
    for key, value in compact.items():
        reference = full[key][:1] if is_network else full[key]
        reference = compact_slices(reference, provenance["select"].get(key.removeprefix("out.")))
        assert value.dtype == reference.dtype and value.tobytes() == reference.tobytes(), key
    dropped = set(full) - set(compact)
    assert all(key.startswith(tuple(provenance["left_out"])) for key in dropped), dropped


@pytest.fixture(scope="module")
def synthetic_weights(tmp_path_factory) -> Path:
    """One folder of synthetic checkpoints for both real runs below (the fill is the slow part)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.slow
def test_real_selftest_over_the_compact_set(synthetic_weights):
    """What `retalk selftest` runs on any install: every network and function, through the real loaders."""
    rows = run_selftest(None, synthetic_weights, "cpu")
    failures = [r for r in rows if not r.passed]
    assert not failures, selftest.format_table(failures)
    assert {r.network for r in rows} == {Path(name).stem for name in CASES}


@pytest.mark.golden
def test_real_selftest_over_shared_golden(golden_dir, synthetic_weights):
    """Every golden file has a case, and every output is reproduced through the real loaders from synthetic
    checkpoints in the official layouts (what `retalk selftest --golden DIR` runs)."""
    rows = run_selftest(golden_dir, synthetic_weights, "cpu")
    failures = [r for r in rows if not r.passed]
    assert not failures, selftest.format_table(failures)
    assert len({r.network for r in rows}) == len(list(golden_dir.glob("*.npz")))

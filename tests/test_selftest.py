"""The selftest runner: comparison rules, case discovery, rows for every failure, and the CLI exit code."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import retalk.selftest as selftest
from retalk.cli import main
from retalk.selftest import compare, run_selftest


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


CASE_TEMPLATE = """
import numpy as np
GOLDEN = "{golden}"
CHECKPOINTS = ()
TOLERANCES = {tolerances}
def run(golden, meta, checkpoints, device):
    assert meta["seed"] == 7
{body}
"""


@pytest.fixture
def cases(tmp_path, monkeypatch):
    """A private case package: modules written here replace retalk/selftest's real cases."""
    folder = tmp_path / "cases"
    folder.mkdir()
    monkeypatch.setattr(selftest, "__path__", [str(folder)])
    written: list[str] = []

    def write(module: str, golden: str, body: str, tolerances: str = "{}") -> None:
        source = CASE_TEMPLATE.format(
            golden=golden, tolerances=tolerances, body=textwrap.indent(body, "    ")
        )
        (folder / f"{module}.py").write_text(source)
        written.append(f"retalk.selftest.{module}")

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _golden(folder, name, **arrays):
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, meta=np.array('{"seed": 7}'), **arrays)


def test_runner_rows_for_pass_fail_missing_and_errors(tmp_path, cases):
    golden = tmp_path / "golden"
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    _golden(golden, "Good.npz", **{"in.x": x, "out.y": 2 * x, "out.z": x + 1})
    _golden(golden, "Bad.npz", **{"in.x": x, "out.y": 2 * x})
    _golden(golden, "Broken.npz", **{"in.x": x, "out.y": 2 * x})
    _golden(golden, "Orphan.npz", **{"in.x": x, "out.y": 2 * x})
    _golden(golden, "Partial.npz", **{"in.x": x, "out.y": 2 * x, "out.w": x})
    cases("selftest_case_good", "Good.npz", 'x = golden["in.x"]\nreturn {"y": 2 * x, "z": x + 1}')
    cases("selftest_case_bad", "Bad.npz", 'return {"y": 2.1 * golden["in.x"]}')
    cases("selftest_case_broken", "Broken.npz", 'raise RuntimeError("boom")')
    cases("selftest_case_partial", "Partial.npz", 'return {"y": 2 * golden["in.x"]}')
    _golden(golden, "Cheat.npz", **{"in.x": x, "out.y": 2 * x})
    cases("selftest_case_cheat", "Cheat.npz", 'return {"y": golden["out.y"]}')
    (tmp_path / "cases" / "selftest_case_syntax.py").write_text("def (:\n")

    rows = run_selftest(golden, tmp_path / "ckpt", "cpu")
    by_key = {(r.network, r.output): r for r in rows}
    assert by_key[("Good", "y")].passed and by_key[("Good", "z")].passed
    assert by_key[("Good", "y")].max_abs == 0.0
    assert not by_key[("Bad", "y")].passed and by_key[("Bad", "y")].rel_l2 == pytest.approx(0.05, rel=1e-4)
    assert not by_key[("Broken", "-")].passed and "boom" in by_key[("Broken", "-")].detail
    assert not by_key[("Orphan", "-")].passed and "no selftest case" in by_key[("Orphan", "-")].detail
    assert by_key[("Partial", "y")].passed and not by_key[("Partial", "w")].passed
    assert not by_key[("Cheat", "-")].passed  # cases get the inputs, never the golden outputs
    assert not by_key[("selftest_case_syntax", "-")].passed  # a module that does not import is a failed row


def test_functions_style_golden_uses_full_keys_and_tolerances(tmp_path, cases):
    golden = tmp_path / "golden"
    _golden(golden, "functions.npz", **{"a.in": np.arange(5.0), "a.out": np.arange(5.0) * 3})
    cases(
        "selftest_case_functions",
        "functions.npz",
        'return {"a.out": golden["a.in"] * 3 + 1e-7}',
        '{"a.out": {"atol": 1e-6}}',
    )
    (row,) = run_selftest(golden, tmp_path / "ckpt", "cpu")
    assert (row.network, row.output, row.passed) == ("functions", "a.out", True)
    assert "1e-06" in row.detail


def test_cli_exit_code(tmp_path, cases, capsys):
    golden = tmp_path / "golden"
    x = np.ones((2, 3), dtype=np.float32)
    _golden(golden, "Tiny.npz", **{"in.x": x, "out.y": x * 3})
    cases("selftest_case_tiny", "Tiny.npz", 'return {"y": golden["in.x"] * 3}')
    argv = ["selftest", "--golden", str(golden), "--checkpoints", str(tmp_path / "ckpt"), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Tiny" in out and "PASS" in out and "FAIL" not in out
    _golden(golden, "Other.npz", **{"in.x": x, "out.y": x})
    assert main(argv) == 1
    assert "no selftest case declares GOLDEN = 'Other.npz'" in capsys.readouterr().out


def test_cli_missing_golden_dir_is_one_line(tmp_path, capsys):
    assert main(["selftest", "--golden", str(tmp_path / "absent"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retalk: error: no golden data at") and "--golden" in err and "\n" not in err


@pytest.mark.golden
def test_real_selftest_over_shared_golden(golden_dir, tmp_path_factory):
    """Every golden file has a case, and every output is reproduced through the real loaders from synthetic
    checkpoints in the official layouts (what `retalk selftest` runs)."""
    rows = run_selftest(golden_dir, tmp_path_factory.mktemp("synthetic"), "cpu")
    failures = [r for r in rows if not r.passed]
    assert not failures, selftest.format_table(failures)
    assert len({r.network for r in rows}) == len(list(golden_dir.glob("*.npz")))

"""benchmarks/gpu.py: ``--dry-run`` runs every step on the CPU and prints both tables; ``--budget-seconds`` cuts
what it measures but not what it prints; without CUDA a real run stops at once, saying why.

The synthetic checkpoints go to the benchmarks' default folder (the user cache), written once and kept: writing
them (1.7 GB) would cost more than the dry run itself.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _network_names() -> list[str]:
    """The networks of benchmarks/models.py's table, the one the script times."""
    spec = importlib.util.spec_from_file_location("benchmark_models", ROOT / "benchmarks" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.NETWORKS)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _row(lines: list[str], first_word: str) -> list[str]:
    rows = [line.split() for line in lines if line.split()[:1] == [first_word]]
    assert len(rows) == 1, f"expected one row for {first_word}: {lines}"
    return rows[0]


def test_dry_run_prints_every_network_and_both_takes_with_finite_numbers():
    done = _run("--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    end_to_end = lines[lines.index(next(x for x in lines if x.startswith("end to end"))) :]
    first, second = (float(v) for v in _row(end_to_end, "fp32")[1:])
    assert math.isfinite(first) and math.isfinite(second) and first > 0 and second > 0
    networks = lines[lines.index(next(x for x in lines if x.startswith("networks"))) :]
    for name in _network_names():
        row = _row(networks, name)
        assert row[1] == "fp32" and len(row) == 4  # batch 1 only: its ms and ms per item
        ms, per_item = float(row[2]), float(row[3])
        assert math.isfinite(ms) and ms > 0 and per_item == ms
    assert "budget ran out" not in done.stdout


def test_an_exhausted_budget_still_prints_the_tables_unmeasured():
    done = _run("--dry-run", "--budget-seconds", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert _row(lines, "fp32") == ["fp32", "-", "-"]
    for name in _network_names():
        assert _row(lines, name) == [name, "fp32", "-", "-"]
    assert "the 0 s budget ran out (--budget-seconds)" in done.stdout


def test_a_real_run_without_cuda_fails_in_one_line():
    done = _run(env={"CUDA_VISIBLE_DEVICES": ""})  # hides any GPU of this machine
    assert done.returncode == 1 and done.stdout == ""
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "no CUDA device" in message[0] and "--dry-run" in message[0]

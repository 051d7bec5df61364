"""``retalk selftest``: every network and function against the golden outputs of the reference code.

Each golden file ``<name>.npz`` (inputs ``in.*``, outputs ``out.*``, a JSON ``meta``) is served by one row of
:data:`retalk.selftest.cases.CASES`. The runner writes the row's checkpoints filled by the deterministic weight
rule, runs the row through the real loaders and compares every output with the reference tolerances. Any
missing case, missing output or exception is a failed row; the run goes on.

Without ``--golden`` it runs the compact golden set shipped in ``retalk/data/golden`` (batch item 0 of each
reference file, some outputs strided; ``retalk/data/golden/README.md`` says how it was cut). A compact file's
``meta["compact"]["select"]`` names, per output, the slices of the full output it keeps; the runner takes the
same slices of what the case returns before comparing.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retalk.checkpoints import get_spec, synth
from retalk.device import autocast
from retalk.errors import InputError
from retalk.selftest.cases import CASES, Case

# The reference data's comparison rule: rel L2 <= 1e-4 and max abs <= 1e-3 * max|ref|, in float64.
REL_L2 = 1e-4
MAX_ABS_OF_PEAK = 1e-3
# 16-bit autocast (--precision): the rel L2 error every output must stay within instead of the fp32 rules.
# Measured worst under bf16 on the CPU: 5.3e-2 (D-Net's warped image); fp16 keeps 3 more mantissa bits.
REDUCED_PRECISION_REL_L2 = {"bf16": 0.1, "fp16": 0.02}


@dataclass(frozen=True)
class SelftestRow:
    network: str  # golden file stem, e.g. "LNet"
    output: str  # output name without "out.", or "-" when the whole case failed
    max_abs: float | None
    rel_l2: float | None
    passed: bool
    detail: str  # the rule applied, or why the row failed


COMPACT_GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden"


def synthetic_bytes(files: list[Path]) -> int:
    """Disk the synthetic checkpoints for the golden ``files`` take (the tensor bytes of each official file)."""
    names = {name for path in files if path.name in CASES for name in CASES[path.name].checkpoints}
    return sum(
        math.prod(entry[1]) * torch.empty((), dtype=getattr(torch, entry[2])).element_size()
        for name in names
        for entry in get_spec(name).entries
    )


def _one_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def compare(
    ref: Any, got: Any, tol: Mapping[str, Any] | None = None, *, network: str = "", output: str = ""
) -> SelftestRow:
    """Compare one output with its golden value.

    Default rule (the reference data's): rel L2 <= 1e-4 and max abs <= 1e-3 * max|ref|. Overrides in ``tol``:
    ``exact`` (identical values), ``min_equal`` (fraction of equal elements, label maps),
    ``max_grey`` (max abs difference, integer images), ``atol``/``rtol`` (elementwise
    ``|got - ref| <= atol + rtol * |ref|``), ``rel_l2`` (relative L2 alone: 16-bit precisions).
    """
    tol = dict(tol or {})
    ref_arr, got_arr = _to_numpy(ref), _to_numpy(got)

    def row(
        passed: bool, detail: str, max_abs: float | None = None, rel_l2: float | None = None
    ) -> SelftestRow:
        return SelftestRow(network, output, max_abs, rel_l2, passed, detail)

    if got_arr.shape != ref_arr.shape:
        return row(False, f"shape {got_arr.shape} vs golden {ref_arr.shape}")
    ref64, got64 = ref_arr.astype(np.float64), got_arr.astype(np.float64)
    if not np.isfinite(got64).all():
        return row(False, "output has NaN or inf")
    diff = np.abs(got64 - ref64)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_norm, diff_norm = float(np.linalg.norm(ref64)), float(np.linalg.norm(got64 - ref64))
    rel_l2 = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else float("inf"))
    if "rel_l2" in tol:
        return row(rel_l2 <= tol["rel_l2"], f"rel L2 <= {tol['rel_l2']:g}", max_abs, rel_l2)
    if tol.get("exact"):
        return row(bool(np.array_equal(got64, ref64)), "exact", max_abs, rel_l2)
    if "min_equal" in tol:
        equal = float(np.mean(got64 == ref64)) if ref64.size else 1.0
        return row(equal >= tol["min_equal"], f"{equal:.5f} equal (>= {tol['min_equal']})", max_abs, rel_l2)
    if "max_grey" in tol:
        return row(max_abs <= tol["max_grey"], f"max abs <= {tol['max_grey']}", max_abs, rel_l2)
    if "atol" in tol or "rtol" in tol:
        atol, rtol = float(tol.get("atol", 0.0)), float(tol.get("rtol", 0.0))
        passed = bool(np.all(diff <= atol + rtol * np.abs(ref64)))
        return row(passed, f"|diff| <= {atol:g} + {rtol:g}*|ref|", max_abs, rel_l2)
    peak = float(np.abs(ref64).max()) if ref64.size else 0.0
    passed = rel_l2 <= REL_L2 and max_abs <= MAX_ABS_OF_PEAK * peak
    return row(passed, f"rel L2 <= {REL_L2:g}, max abs <= {MAX_ABS_OF_PEAK:g}*{peak:.4g}", max_abs, rel_l2)


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of a golden file and its JSON metadata (``meta``; ``notes``/``versions`` in functions.npz).

    An array stored as ``<key>#codes`` and ``<key>#values`` (the compact set's lossless form of inputs with few
    distinct values) is returned as ``<key>`` = ``values[codes]``, bit for bit the reference's array.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            value = data[key]
            if value.dtype.kind == "U" and value.ndim == 0 and key in ("meta", "notes", "versions"):
                try:
                    parsed = json.loads(str(value))
                except ValueError:
                    parsed = str(value)
                if key == "meta" and isinstance(parsed, dict):
                    meta.update(parsed)
                else:
                    meta[key] = parsed
            elif key.endswith("#codes"):
                arrays[key.removesuffix("#codes")] = data[key.replace("#codes", "#values")][value]
            elif not key.endswith("#values"):
                arrays[key] = value
    return arrays, meta


def compact_slices(value: np.ndarray, spec: list[list[int | None]] | None) -> np.ndarray:
    """The slices ``spec`` (one ``[start, stop, step]`` per leading axis) of an output, as the compact set keeps."""
    return value if spec is None else value[tuple(slice(*axis) for axis in spec)]


def run_case(
    golden_path: Path,
    case: Case,
    checkpoints_dir: Path,
    device: torch.device,
    precision: str = "fp32",
    backend: str = "torch",
) -> list[SelftestRow]:
    network = golden_path.stem
    try:
        golden, meta = load_golden(golden_path)
        synth(checkpoints_dir, case.checkpoints)
        inputs = {k: v for k, v in golden.items() if not k.startswith("out.")}  # the case never sees answers
        with torch.inference_mode(), autocast(device, precision):
            outputs = case.run(inputs, meta, checkpoints_dir, device, backend)
    except Exception as err:  # one broken case is one failed row, not a crashed selftest
        where = traceback.extract_tb(err.__traceback__)[-1]
        detail = f"{_one_line(err)} ({Path(where.filename).name}:{where.lineno})"
        return [SelftestRow(network, "-", None, None, False, detail)]
    tolerances: Mapping[str, Mapping[str, Any]] = case.tolerances
    if precision != "fp32":
        reduced = {"rel_l2": REDUCED_PRECISION_REL_L2[precision]}
        tolerances = {name: reduced for name in outputs}
    select = meta.get("compact", {}).get("select", {})
    expected = [k.removeprefix("out.") for k in golden if k.startswith("out.")]
    rows = [
        SelftestRow(network, name, None, None, False, "the case does not return this output")
        for name in expected
        if name not in outputs
    ]
    for name, value in outputs.items():
        ref = golden.get(f"out.{name}", golden.get(name))
        if ref is None:
            rows.append(SelftestRow(network, name, None, None, False, "not in the golden file"))
        else:
            got = compact_slices(np.asarray(value), select.get(name))
            rows.append(compare(ref, got, tolerances.get(name), network=network, output=name))
    if not rows:
        rows.append(SelftestRow(network, "-", None, None, False, "the case returned no outputs"))
    return rows


@contextlib.contextmanager
def checkpoints_folder(keep: Path | None) -> Iterator[Path]:
    """``keep``, or a temporary folder removed afterwards (the synthetic weights take over a gigabyte)."""
    if keep is not None:
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="retalk-selftest-") as folder:
        yield Path(folder)


def golden_files(golden_dir: str | Path | None) -> list[Path]:
    """The ``*.npz`` files of ``golden_dir`` (default: the compact set shipped with retalk)."""
    golden_dir = Path(golden_dir) if golden_dir is not None else COMPACT_GOLDEN
    if not golden_dir.is_dir():
        raise InputError(f"--golden {golden_dir}: no such folder; pass the folder of the golden *.npz files")
    files = sorted(golden_dir.glob("*.npz"))
    if not files:
        raise InputError(f"--golden {golden_dir}: holds no *.npz golden files")
    return files


def run_selftest(
    golden_dir: str | Path | None = None,
    checkpoints_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    *,
    backend: str = "torch",
    cases: Mapping[str, Case] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> list[SelftestRow]:
    """Run every golden file in ``golden_dir`` (default: the compact set) through its case; one row per compared
    output. Synthetic checkpoints go to ``checkpoints_dir`` (kept) or, by default, a temporary folder; with
    ``backend`` "openvino" the networks run their OpenVINO models, converted into that folder."""
    files = golden_files(golden_dir)
    cases = CASES if cases is None else cases
    device = torch.device(device)
    rows: list[SelftestRow] = []
    with checkpoints_folder(Path(checkpoints_dir) if checkpoints_dir is not None else None) as folder:
        for path in files:
            if on_start:
                on_start(path.name)
            case = cases.get(path.name)
            if case is None:
                rows.append(
                    SelftestRow(path.stem, "-", None, None, False, f"no selftest case for {path.name}")
                )
            else:
                rows.extend(run_case(path, case, folder, device, precision, backend))
    return rows


def format_table(rows: list[SelftestRow]) -> str:
    """Plain-text table: network, output, max abs error, rel L2 error, PASS/FAIL and the rule or reason."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3e}"

    lines = [("network", "output", "max abs", "rel L2", "result", "rule / reason")]
    lines += [
        (r.network, r.output, number(r.max_abs), number(r.rel_l2), "PASS" if r.passed else "FAIL", r.detail)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:5], widths, strict=True)) + "  " + line[5]
        for line in lines
    )


def rows_to_json(rows: list[SelftestRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]

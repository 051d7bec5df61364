"""Whether a checkpoint file is sound, without reading its 1.5 GB of tensors: container layout, keys and
shapes (PyTorch files), variables (.mat), archive structure (TorchScript), readability (dlib)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retalk.checkpoints.catalogue import CHECKPOINTS, CheckpointSpec, find_checkpoint, get_spec
from retalk.errors import CheckpointError


@dataclass(frozen=True)
class VerifyResult:
    name: str
    status: str  # ok | not-needed | missing | truncated | corrupt | wrong | bad-keys
    path: Path | None
    message: str  # one line: what is wrong and the fix (or what was checked)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "not-needed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ok": self.ok,
            "path": str(self.path) if self.path else None,
            "message": self.message,
        }


def _result(spec: CheckpointSpec, status: str, path: Path, problem: str) -> VerifyResult:
    """A result whose message names the file; a failed one ends with the fix."""
    fix = "" if status == "ok" else f"; delete it and run `retalk models fetch {spec.name}`"
    return VerifyResult(spec.name, status, path, f"{spec.name}: {problem}{fix}")


def _looks_truncated(path: Path, spec: CheckpointSpec) -> bool:
    """A zip that lost its end (central directory), or a file shorter than the known size."""
    if spec.size is not None and path.stat().st_size < spec.size:
        return True
    with path.open("rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK") and not zipfile.is_zipfile(path)


def _tensor_shapes(obj: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    import torch  # lazily: the preview path never needs torch

    if obj is None:
        return {}
    return {k: tuple(v.shape) for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _match(obj: Any, spec: CheckpointSpec) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, wrong shapes, unexpected keys) of a loaded file against ``spec``'s manifest."""
    container = spec.container
    assert container is not None
    shapes = _tensor_shapes(container.unwrap(obj))
    renamed = container.rename(shapes)
    found = {model_key: shapes[file_key] for file_key, model_key in renamed.items()}
    expected = {e[0]: tuple(e[1]) for e in spec.entries}
    missing = [k for k in expected if k not in found]
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    unexpected = [k for k in found if k not in expected]
    return missing, wrong, unexpected


def _look_alike(obj: Any, name: str) -> str | None:
    """The other official PyTorch file whose keys and shapes this object matches (>= 90 %), if any."""
    best, best_score = None, 0.9
    for other in CHECKPOINTS.values():
        if other.name == name or other.kind != "torch":
            continue
        missing, wrong, _ = _match(obj, other)
        score = 1 - (len(missing) + len(wrong)) / len(other.entries)
        if score >= best_score:
            best, best_score = other.name, score
    return best


def _few(items: Sequence[str]) -> str:
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def _verify_torch(path: Path, spec: CheckpointSpec) -> VerifyResult:
    from retalk.models.checkpoint import load_torch_file  # lazily: the preview path never needs torch

    if _looks_truncated(path, spec):
        return _result(spec, "truncated", path, f"{path} is truncated ({path.stat().st_size} bytes)")
    try:  # memory-mapped: only the pickled key/shape metadata is read, not the 1.5 GB of tensors
        obj = load_torch_file(path, name=spec.name)
    except CheckpointError as err:  # damaged, or naming code no checkpoint needs
        return VerifyResult(spec.name, "corrupt", path, str(err))
    missing, wrong, unexpected = _match(obj, spec)
    container = spec.container
    assert container is not None
    expected = len(spec.entries)
    if len(missing) + len(wrong) > expected // 2:
        alike = _look_alike(obj, spec.name)
        if alike:
            return VerifyResult(
                spec.name,
                "wrong",
                path,
                f"{spec.name}: {path} looks like {alike}, not {spec.name}; "
                f"put the real {spec.name} there (`retalk models fetch {spec.name}`)",
            )
        layout = " or ".join(repr(k) for k in container.top_level) or "a plain state dict"
        return _result(
            spec,
            "wrong",
            path,
            f"{path} does not hold {spec.name}'s weights ({layout}; {len(missing)} of {expected} keys missing, "
            f"e.g. {_few(missing)})",
        )
    if missing or wrong:
        problems = ([f"{len(missing)} missing key(s): {_few(missing)}"] if missing else []) + (
            [f"{len(wrong)} wrong shape(s): {_few(wrong)}"] if wrong else []
        )
        return _result(spec, "bad-keys", path, f"{path}: {'; '.join(problems)}")
    if unexpected and not container.extra_keys_allowed:
        return _result(
            spec, "bad-keys", path, f"{path}: {len(unexpected)} unexpected key(s): {_few(unexpected)}"
        )
    extra = f" ({len(unexpected)} extra keys the reference ignores)" if unexpected else ""
    return _result(spec, "ok", path, f"{expected} keys and shapes match{extra}")


def _verify_mat(path: Path, spec: CheckpointSpec) -> VerifyResult:
    import scipy.io

    try:
        variables = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError/TypeError/OSError/MatReadError for a bad file
        return _result(spec, "corrupt", path, f"{path} is not a readable .mat file ({type(err).__name__})")
    for variable, (rows, min_cols) in spec.variables.items():
        value = variables.get(variable)
        if (
            not isinstance(value, np.ndarray)
            or value.ndim != 2
            or value.shape[0] != rows
            or value.shape[1] < min_cols
        ):
            shape = getattr(value, "shape", None)
            return _result(
                spec,
                "bad-keys",
                path,
                f"{path} lacks a ({rows}, {min_cols}) array {variable!r} (found {shape})",
            )
    return _result(spec, "ok", path, f"variables {', '.join(spec.variables)} present")


def _verify_torchscript(path: Path, spec: CheckpointSpec) -> VerifyResult:
    if _looks_truncated(path, spec):
        return _result(spec, "truncated", path, f"{path} is truncated")
    if not zipfile.is_zipfile(path):
        return _result(spec, "corrupt", path, f"{path} is not a TorchScript archive (not a zip)")
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
    # TorchScript archives hold code/ plus data.pkl (torch >= 1.4) or model.json (older writers)
    has_code = any(m.startswith("code/") or "/code/" in m for m in members)
    if not has_code or not any(m.endswith(("data.pkl", "model.json")) for m in members):
        return _result(spec, "wrong", path, f"{path} is a zip but not a TorchScript module")
    return _result(spec, "ok", path, "TorchScript archive structure present (weights not checked)")


def _verify_dlib(path: Path, spec: CheckpointSpec) -> VerifyResult:
    import dlib

    try:
        dlib.shape_predictor(str(path))
    except RuntimeError as err:
        detail = str(err).splitlines()[0] if str(err) else "unreadable"
        return _result(spec, "corrupt", path, f"dlib cannot read {path} ({detail[:100]})")
    return _result(spec, "ok", path, "dlib loads it")


_VERIFIERS: dict[str, Callable[[Path, CheckpointSpec], VerifyResult]] = {
    "torch": _verify_torch,
    "mat": _verify_mat,
    "torchscript": _verify_torchscript,
    "dlib": _verify_dlib,
}


def verify_file(path: str | Path, name: str) -> VerifyResult:
    """Check one file against the official ``name``: layout, keys and shapes (PyTorch), variables (.mat)."""
    spec = get_spec(name)
    return _VERIFIERS[spec.kind](Path(path), spec)


def verify(
    checkpoints_dir: str | Path | None = None, names: Iterable[str] | None = None
) -> list[VerifyResult]:
    """One result per official file (or per ``names``), for the file :func:`find_checkpoint` would use."""
    results = []
    for spec in (get_spec(n) for n in names) if names is not None else CHECKPOINTS.values():
        try:
            path = find_checkpoint(spec.name, checkpoints_dir)
        except CheckpointError as err:
            if spec.required:
                results.append(VerifyResult(spec.name, "missing", None, str(err)))
            else:
                message = f"{spec.name}: absent (optional: {spec.purpose})"
                results.append(VerifyResult(spec.name, "not-needed", None, message))
            continue
        results.append(verify_file(path, spec.name))
    return results

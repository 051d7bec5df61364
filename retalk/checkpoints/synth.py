"""Stand-ins of the official files, filled by the deterministic weight rule (:mod:`retalk.synthetic`): the
networks run on them exactly as on the reference's rule-filled weights, so ``retalk selftest`` and the tests
check the code against the golden outputs without the real 3 GB of checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from retalk.checkpoints.catalogue import CHECKPOINTS, CheckpointSpec, get_spec
from retalk.checkpoints.download import temp_beside
from retalk.errors import CheckpointError

SYNTH_STAMP = ".retalk-synthetic.json"  # what `synth` wrote in a folder, so a second run skips it cheaply
# Version of the fill of the non-PyTorch stand-ins (.mat files, FAN archive); bump when their recipe changes.
_OTHER_FILL = "rule-v1"


def _fill_id(spec: CheckpointSpec) -> str:
    return spec.fill_sha256 or _OTHER_FILL


def _read_stamps(dest: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((dest / SYNTH_STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _synth_state(dest: Path, spec: CheckpointSpec, stamps: Mapping[str, Mapping[str, Any]]) -> str:
    """ "absent", "current" (ours, current fill), "stale" (ours, older fill) or "foreign" (not written by synth)."""
    stamp, path = stamps.get(spec.name), dest / spec.name
    if not path.is_file():
        return "absent"
    stat = path.stat()
    if not stamp or stamp.get("size") != stat.st_size or stamp.get("mtime_ns") != stat.st_mtime_ns:
        return "foreign"
    return "current" if stamp.get("fill") == _fill_id(spec) else "stale"


def is_synthetic(path: str | Path, name: str) -> bool:
    """Whether the file ``path`` of the official ``name`` is a stand-in written by :func:`synth` (its weights
    follow the deterministic rule: networks run, but a detector finds no real faces)."""
    spec, path = get_spec(name), Path(path)
    dest = path.parents[len(Path(spec.name).parts) - 1]
    return _synth_state(dest, spec, _read_stamps(dest)) in ("current", "stale")


def _write_torch(spec: CheckpointSpec, tmp: Path) -> None:
    import torch  # lazily: the preview path never needs torch

    from retalk.synthetic import deterministic_state_dict, state_dict_sha256

    container = spec.container
    assert container is not None
    state = deterministic_state_dict(spec.entries)
    if state_dict_sha256(state) != spec.fill_sha256:  # a torch version whose generator changed
        raise CheckpointError(
            f"{spec.name}: the weight rule no longer reproduces the manifest fill on torch {torch.__version__}"
        )
    # E-Net's file holds E-Net's own keys only (its manifest scope): its L-Net always comes from L-Net's file.
    torch.save(
        {container.top_level[0]: state}
        if container.top_level and not container.top_level_optional
        else state,
        tmp,
    )


def _write_mat(spec: CheckpointSpec, tmp: Path) -> None:
    import scipy.io
    import torch  # lazily: the preview path never needs torch

    from retalk.synthetic import deterministic_tensor

    dtype = getattr(torch, spec.variable_dtype)
    variables = {k: deterministic_tensor(k, shape, dtype).numpy() for k, shape in spec.variables.items()}
    with tmp.open("wb") as handle:
        scipy.io.savemat(handle, variables)


def _write_fan(spec: CheckpointSpec, tmp: Path) -> None:
    from retalk.models.fan import write_synthetic_archive  # lazily: the preview path never needs torch

    write_synthetic_archive(tmp)


_WRITERS: dict[str, Callable[[CheckpointSpec, Path], None]] = {
    "torch": _write_torch,
    "mat": _write_mat,
    "torchscript": _write_fan,
}


def synth(
    dest: str | Path, names: Iterable[str] | None = None, *, report: Callable[[str], None] | None = None
) -> list[Path]:
    """Write stand-ins of the official files into ``dest``, filled by the deterministic weight rule.

    Each file has the official container layout, so the real loaders read it. Files this folder already
    holds with the current fill are skipped (a stamp file records size, mtime and fill); a file it did not
    write is never overwritten (CheckpointError), so real checkpoints are safe. A file that cannot be
    synthesised (the dlib model) is reported through ``report`` and left out of the returned paths.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    specs = [get_spec(n) for n in names] if names is not None else list(CHECKPOINTS.values())
    stamps = _read_stamps(dest)
    paths = []
    for spec in specs:
        path = dest / spec.name
        state = _synth_state(dest, spec, stamps)
        if state == "foreign":  # e.g. --checkpoints pointing at the real files: never overwrite those
            raise CheckpointError(
                f"{path} exists and was not written by `retalk models synth`; "
                "synthetic checkpoints go into a folder of their own: pass an empty or synthetic-only folder"
            )
        if state != "current":
            writer = _WRITERS.get(spec.kind)
            if writer is None:
                if report:
                    report(f"{spec.name}: skipped, no synthetic stand-in for a {spec.kind} file")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_beside(path)
            try:
                writer(spec, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)  # never leave half a file behind
                raise
            os.replace(tmp, path)
            stat = path.stat()
            stamps[spec.name] = {"fill": _fill_id(spec), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            stamp_tmp = temp_beside(dest / SYNTH_STAMP)
            stamp_tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True))
            os.replace(stamp_tmp, dest / SYNTH_STAMP)
        paths.append(path)
    return paths

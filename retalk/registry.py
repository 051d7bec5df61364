"""The official checkpoint files: where they come from, where retalk looks for them, and whether they are sound.

One table (:data:`CHECKPOINTS`) names every file the neural engine can load: its source URL, its loader
and, for the PyTorch files, the container layout plus every key and shape of the state dict (compact
data in ``retalk/data/checkpoints.json.gz``, derived from the reference manifests). On top of it:
locating files (:func:`find_checkpoint`), checking them without reading 1.5 GB (:func:`verify`),
downloading with resume (:func:`fetch`) and writing stand-ins filled by the deterministic weight rule
(:func:`synth`) for tests and ``retalk selftest``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import importlib.resources
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
from tqdm import tqdm

from retalk.errors import CheckpointError

RELEASE = "https://github.com/vinthony/video-retalking/releases/download/v0.0.1/"
FACE_ALIGNMENT = "https://www.adrianbulat.com/downloads/python-fan/"
ENV_VAR = "RETALK_CHECKPOINTS"
SYNTH_STAMP = ".retalk-synthetic.json"  # what `synth` wrote in a folder, so a second run skips it cheaply
# Version of the fill of the non-PyTorch stand-ins (.mat files, FAN archive); bump when their recipe changes.
_OTHER_FILL = "rule-v1"


@dataclass(frozen=True)
class Container:
    """How the reference reads a PyTorch checkpoint: which dict to unwrap and how it rewrites the keys."""

    top_level: tuple[str, ...]  # keys tried in order; empty = a plain state dict
    top_level_optional: bool  # RetinaFace: 'state_dict' if present, else the plain dict
    key_transform: str  # "none" | "strip_leading_module" | "drop_low_res_replace_module"
    extra_keys_allowed: bool  # the reference loads with strict=False (or filters to the model's keys)

    def unwrap(self, obj: Any) -> Mapping[str, Any] | None:
        """The state dict inside ``obj`` as the reference finds it, or None when the layout differs."""
        if not isinstance(obj, Mapping):
            return None
        for key in self.top_level:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        return obj if not self.top_level or self.top_level_optional else None

    def rename(self, keys: Iterable[str]) -> dict[str, str]:
        """Map each kept file key to the reference model key (the reference's own transform)."""
        if self.key_transform == "none":
            return {k: k for k in keys}
        if self.key_transform == "strip_leading_module":
            return {k: k.removeprefix("module.") for k in keys}
        if self.key_transform == "drop_low_res_replace_module":
            return {k: k.replace("module.", "") for k in keys if "low_res" not in k}
        raise ValueError(f"unknown key transform {self.key_transform!r}")


@dataclass(frozen=True)
class CheckpointSpec:
    """One official file. ``size``/``sha256`` are None where the exact value is not known to us."""

    name: str  # official file name (a path relative to the checkpoints folder for BFM)
    url: str
    loader: str  # "module:function", resolved lazily
    required: bool  # needed by the neural engine by default
    kind: str  # "torch" | "mat" | "torchscript" | "dlib"
    about: str  # approximate size for `retalk models list`, not a check
    purpose: str
    size: int | None = None
    sha256: str | None = None
    archive_member: str | None = None  # the file is this member of the downloaded zip
    fetched_by_default: bool = (
        False  # optional, yet a plain `retalk models fetch` gets it (used when present)
    )

    @property
    def default_download(self) -> bool:
        return self.required or self.fetched_by_default

    @property
    def container(self) -> Container | None:
        data = _compact().get(self.name)
        if data is None:
            return None
        layout = data["container"]
        return Container(
            top_level=tuple(layout["top_level"]),
            top_level_optional=layout["top_level_optional"],
            key_transform=layout["key_transform"],
            extra_keys_allowed=layout["extra_keys_allowed"],
        )

    @property
    def entries(self) -> list[list[Any]]:
        """Ordered reference state-dict entries ``[key, shape, dtype(, options)]`` (PyTorch files only)."""
        return _compact()[self.name]["entries"] if self.name in _compact() else []

    @property
    def fill_sha256(self) -> str | None:
        return _compact()[self.name]["fill_sha256"] if self.name in _compact() else None


CHECKPOINTS: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        CheckpointSpec(
            "LNet.pth",
            RELEASE + "LNet.pth",
            "retalk.models.lnet:load_lnet",
            True,
            "torch",
            "1.53 GB",
            "L-Net: lip-sync at 96x96",
        ),
        CheckpointSpec(
            "ENet.pth",
            RELEASE + "ENet.pth",
            "retalk.models.enet:load_enet",
            True,
            "torch",
            "573 MB",
            "E-Net: lip-sync enhancement at 384x384",
        ),
        CheckpointSpec(
            "DNet.pt",
            RELEASE + "DNet.pt",
            "retalk.models.dnet:load_dnet",
            True,
            "torch",
            "180 MB",
            "D-Net: expression-neutral reference frames",
        ),
        CheckpointSpec(
            "face3d_pretrain_epoch_20.pth",
            RELEASE + "face3d_pretrain_epoch_20.pth",
            "retalk.models.face3d:load_face3d",
            True,
            "torch",
            "289 MB",
            "3DMM coefficients (Deep3DFaceRecon ResNet-50)",
        ),
        CheckpointSpec(
            "GFPGANv1.3.pth",
            RELEASE + "GFPGANv1.3.pth",
            "retalk.models.gfpgan:load_gfpgan",
            True,
            "torch",
            "349 MB",
            "GFPGAN face restoration",
        ),
        CheckpointSpec(
            "GPEN-BFR-512.pth",
            RELEASE + "GPEN-BFR-512.pth",
            "retalk.models.gpen:load_gpen",
            True,
            "torch",
            "284 MB",
            "GPEN reference enhancement",
        ),
        CheckpointSpec(
            "ParseNet-latest.pth",
            RELEASE + "ParseNet-latest.pth",
            "retalk.models.parsing:load_parsenet",
            True,
            "torch",
            "85 MB",
            "face parsing (mouth mask)",
        ),
        CheckpointSpec(
            "RetinaFace-R50.pth",
            RELEASE + "RetinaFace-R50.pth",
            "retalk.models.retinaface:load_retinaface",
            False,  # the neural engine reuses the track instead of detecting again
            "torch",
            "109 MB",
            "GPEN's face detector",
        ),
        CheckpointSpec(
            "s3fd-619a316812.pth",
            FACE_ALIGNMENT + "s3fd-619a316812.pth",
            "retalk.models.s3fd:load_s3fd",
            False,  # without it the neural engine tracks with dlib (retalk.tracking)
            "torch",
            "90 MB",
            "S3FD face detector: the neural engine's face boxes (else dlib's)",
            fetched_by_default=True,  # the reference's detector, as the reference downloads it
        ),
        CheckpointSpec(
            "2DFAN4-cd938726ad.zip",
            FACE_ALIGNMENT + "2DFAN4-cd938726ad.zip",
            "retalk.models.fan:load_fan",
            False,  # as S3FD
            "torchscript",
            "96 MB",
            "FAN 68-point landmarks (face-alignment, TorchScript): the neural engine's (else dlib's)",
            fetched_by_default=True,
        ),
        CheckpointSpec(
            "expression.mat",
            RELEASE + "expression.mat",
            "scipy.io:loadmat",
            True,
            "mat",
            "1.4 KB",
            "expression templates (neutral, smile)",
        ),
        CheckpointSpec(
            "BFM/similarity_Lm3D_all.mat",
            RELEASE + "BFM.zip",
            "retalk.align:load_lm3d",
            False,  # its 5-point reduction is retalk.align.LM3D_STD (checked against the golden data)
            "mat",
            "1 KB (in BFM.zip)",
            "BFM 68-point 3D landmark template",
            archive_member="similarity_Lm3D_all.mat",
        ),
        CheckpointSpec(
            "30_net_gen.pth",
            RELEASE + "30_net_gen.pth",
            "retalk.models.ganimation:load_ganimation",
            False,
            "torch",
            "34 MB",
            "GANimation upper-face edit (--upper-face only)",
        ),
        CheckpointSpec(
            "shape_predictor_68_face_landmarks.dat",
            RELEASE + "shape_predictor_68_face_landmarks.dat",
            "dlib:shape_predictor",
            False,
            "dlib",
            "100 MB",
            "dlib 68-point landmarks (the tracker also finds it in face_recognition_models)",
        ),
    )
}

# What each .mat file must hold: variable -> (rows, minimum columns) as the pipeline indexes it.
_MAT_VARIABLES: dict[str, dict[str, tuple[int, int]]] = {
    "expression.mat": {"expression_center": (1, 64), "expression_mouth": (1, 64)},
    "BFM/similarity_Lm3D_all.mat": {"lm": (68, 3)},
}


@functools.cache
def _compact() -> dict[str, dict[str, Any]]:
    """The compact manifest data shipped with the package (one gzipped JSON)."""
    raw = importlib.resources.files("retalk").joinpath("data/checkpoints.json.gz").read_bytes()
    return json.loads(gzip.decompress(raw))["files"]


def get_spec(name: str) -> CheckpointSpec:
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise CheckpointError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}") from None


def default_checkpoints_dir() -> Path:
    return Path(platformdirs.user_cache_dir("retalk")) / "checkpoints"


def search_dirs(checkpoints_dir: str | Path | None = None) -> list[Path]:
    """Where checkpoints are looked for, in order: --checkpoints DIR, $RETALK_CHECKPOINTS, the user cache."""
    dirs = [Path(checkpoints_dir).expanduser()] if checkpoints_dir is not None else []
    dirs += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    dirs.append(default_checkpoints_dir())
    return list(dict.fromkeys(dirs))


def find_checkpoint(name: str, checkpoints_dir: str | Path | None = None) -> Path:
    """The first ``name`` in :func:`search_dirs`; CheckpointError saying where it looked otherwise."""
    spec = get_spec(name)
    dirs = search_dirs(checkpoints_dir)
    for folder in dirs:
        if (folder / spec.name).is_file():
            return folder / spec.name
    raise CheckpointError(
        f"{spec.name} not found in {', '.join(map(str, dirs))}; run `retalk models fetch {spec.name}` "
        f"or pass --checkpoints DIR (or set {ENV_VAR})"
    )


def file_identity(path: str | Path) -> str:
    """Name, size and modification time of a file: what a cache key needs to notice a replaced checkpoint."""
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def missing_checkpoints(checkpoints_dir: str | Path | None = None, *, upper_face: bool = False) -> list[str]:
    """Names of the files the neural engine needs that are not in any search folder (existence only)."""
    dirs = search_dirs(checkpoints_dir)
    wanted = [s for s in CHECKPOINTS.values() if s.required or (upper_face and s.name == "30_net_gen.pth")]
    return [s.name for s in wanted if not any((d / s.name).is_file() for d in dirs)]


def resolve_loader(spec: CheckpointSpec) -> Callable[..., Any]:
    """Import the loader named by ``spec.loader`` ("module:function")."""
    module, _, function = spec.loader.partition(":")
    return getattr(importlib.import_module(module), function)


# ----------------------------------------------------------------------------------------------- verify


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


def _refetch(name: str) -> str:
    return f"delete it and run `retalk models fetch {name}`"


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

    def result(status: str, message: str) -> VerifyResult:
        return VerifyResult(spec.name, status, path, f"{spec.name}: {message}")

    if _looks_truncated(path, spec):
        return result(
            "truncated", f"{path} is truncated ({path.stat().st_size} bytes); {_refetch(spec.name)}"
        )
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
            return result(
                "wrong",
                f"{path} looks like {alike}, not {spec.name}; put the real {spec.name} there (`retalk models fetch {spec.name}`)",
            )
        layout = " or ".join(repr(k) for k in container.top_level) or "a plain state dict"
        return result(
            "wrong",
            f"{path} does not hold {spec.name}'s weights ({layout}; {len(missing)} of {expected} keys missing, "
            f"e.g. {_few(missing)}); {_refetch(spec.name)}",
        )
    if missing or wrong:
        problems = ([f"{len(missing)} missing key(s): {_few(missing)}"] if missing else []) + (
            [f"{len(wrong)} wrong shape(s): {_few(wrong)}"] if wrong else []
        )
        return result("bad-keys", f"{path}: {'; '.join(problems)}; {_refetch(spec.name)}")
    if unexpected and not container.extra_keys_allowed:
        return result(
            "bad-keys",
            f"{path}: {len(unexpected)} unexpected key(s): {_few(unexpected)}; {_refetch(spec.name)}",
        )
    extra = f" ({len(unexpected)} extra keys the reference ignores)" if unexpected else ""
    return result("ok", f"{expected} keys and shapes match{extra}")


def _verify_mat(path: Path, spec: CheckpointSpec) -> VerifyResult:
    import scipy.io

    try:
        variables = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError/TypeError/OSError/MatReadError for a bad file
        return VerifyResult(
            spec.name,
            "corrupt",
            path,
            f"{spec.name}: {path} is not a readable .mat file ({type(err).__name__}); {_refetch(spec.name)}",
        )
    for variable, (rows, min_cols) in _MAT_VARIABLES[spec.name].items():
        value = variables.get(variable)
        if (
            not isinstance(value, np.ndarray)
            or value.ndim != 2
            or value.shape[0] != rows
            or value.shape[1] < min_cols
        ):
            shape = getattr(value, "shape", None)
            return VerifyResult(
                spec.name,
                "bad-keys",
                path,
                f"{spec.name}: {path} lacks a ({rows}, {min_cols}) array {variable!r} (found {shape}); {_refetch(spec.name)}",
            )
    return VerifyResult(
        spec.name, "ok", path, f"{spec.name}: variables {', '.join(_MAT_VARIABLES[spec.name])} present"
    )


def _verify_torchscript(path: Path, spec: CheckpointSpec) -> VerifyResult:
    if _looks_truncated(path, spec):
        return VerifyResult(
            spec.name, "truncated", path, f"{spec.name}: {path} is truncated; {_refetch(spec.name)}"
        )
    if not zipfile.is_zipfile(path):
        return VerifyResult(
            spec.name,
            "corrupt",
            path,
            f"{spec.name}: {path} is not a TorchScript archive (not a zip); {_refetch(spec.name)}",
        )
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
    # TorchScript archives hold code/ plus data.pkl (torch >= 1.4) or model.json (older writers)
    has_code = any(m.startswith("code/") or "/code/" in m for m in members)
    if not has_code or not any(m.endswith(("data.pkl", "model.json")) for m in members):
        return VerifyResult(
            spec.name,
            "wrong",
            path,
            f"{spec.name}: {path} is a zip but not a TorchScript module; {_refetch(spec.name)}",
        )
    return VerifyResult(
        spec.name, "ok", path, f"{spec.name}: TorchScript archive structure present (weights not checked)"
    )


def _verify_dlib(path: Path, spec: CheckpointSpec) -> VerifyResult:
    import dlib

    try:
        dlib.shape_predictor(str(path))
    except RuntimeError as err:
        detail = str(err).splitlines()[0] if str(err) else "unreadable"
        return VerifyResult(
            spec.name,
            "corrupt",
            path,
            f"{spec.name}: dlib cannot read {path} ({detail[:100]}); {_refetch(spec.name)}",
        )
    return VerifyResult(spec.name, "ok", path, f"{spec.name}: dlib loads it")


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
            status = "missing" if spec.required else "not-needed"
            results.append(
                VerifyResult(
                    spec.name,
                    status,
                    None,
                    str(err) if spec.required else f"{spec.name}: absent (optional: {spec.purpose})",
                )
            )
            continue
        results.append(verify_file(path, spec.name))
    return results


# ------------------------------------------------------------------------------------------------ fetch


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, *, label: str, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming from its current length with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(
        url, headers={"User-Agent": "retalk", **({"Range": f"bytes={have}-"} if have else {})}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already complete; the checks below decide
            return
        raise CheckpointError(
            f"{label}: {url} answered HTTP {err.code} {err.reason}; check the URL or download it by hand into the checkpoints folder"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CheckpointError(
            f"{label}: cannot reach {url} ({reason}); check the network (or download it by hand into the checkpoints folder)"
        ) from None
    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        with (
            part.open("ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=label,
                disable=not progress,
            ) as bar,
        ):
            try:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            except OSError as err:  # connection lost: keep the .part for the next run to resume
                raise CheckpointError(
                    f"{label}: download interrupted ({err}); run the same command again to resume"
                ) from None


def fetch(
    names: Iterable[str] | None = None,
    dest: str | Path | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> list[Path]:
    """Download official files (default: the required ones and the reference's face detector and landmark
    network, which the neural engine uses when present) into ``dest`` (default: the first search folder).

    Files already present are kept. Each download goes to ``<file>.part`` (resumed if a previous run was
    cut short), is checked against the known size/sha256, and is renamed into place only when complete.
    """
    dest = Path(dest).expanduser() if dest is not None else search_dirs()[0]
    specs = (
        [get_spec(n) for n in names]
        if names is not None
        else [s for s in CHECKPOINTS.values() if s.default_download]
    )
    paths = []
    for spec in specs:
        target = dest / spec.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            download = target.with_name(Path(spec.url).name) if spec.archive_member else target
            part = download.with_name(download.name + ".part")
            _download(spec.url, part, label=spec.name, progress=progress, timeout=timeout)
            _check_download(part, spec)
            candidate = _extract_member(part, spec, target) if spec.archive_member else part
            result = verify_file(candidate, spec.name)
            if not result.ok:  # e.g. an HTML error page served with status 200
                candidate.unlink(missing_ok=True)
                part.unlink(missing_ok=True)
                raise CheckpointError(
                    f"{spec.name}: the download from {spec.url} is not a usable file ({result.status}); "
                    "removed it; check the URL or download it by hand into the checkpoints folder"
                )
            os.replace(candidate, target)
            part.unlink(missing_ok=True)
        paths.append(target)
    return paths


def _check_download(part: Path, spec: CheckpointSpec) -> None:
    size = part.stat().st_size
    problem = None
    if spec.size is not None and size != spec.size:
        problem = f"has {size} bytes, expected {spec.size}"
    elif spec.sha256 is not None and (digest := _sha256_file(part)) != spec.sha256:
        problem = f"sha256 {digest[:12]}... does not match {spec.sha256[:12]}..."
    if problem:
        part.unlink()
        raise CheckpointError(
            f"{spec.name}: the download from {spec.url} {problem}; deleted it, run `retalk models fetch {spec.name}` again"
        )


def _extract_member(archive_path: Path, spec: CheckpointSpec, target: Path) -> Path:
    """Copy ``spec.archive_member`` (matched by file name anywhere in the zip) beside ``target``."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            member = next((m for m in archive.namelist() if Path(m).name == spec.archive_member), None)
            if member is None:
                archive_path.unlink()
                raise CheckpointError(
                    f"{spec.name}: {spec.url} has no {spec.archive_member}; download it by hand into {target.parent}"
                )
            tmp = _temp_beside(target)
            with archive.open(member) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
            return tmp
    except zipfile.BadZipFile:
        archive_path.unlink()
        raise CheckpointError(
            f"{spec.name}: the download from {spec.url} is not a zip; run `retalk models fetch {spec.name}` again"
        ) from None


def _temp_beside(path: Path) -> Path:
    """A fresh temporary file in ``path``'s folder (same file system, so os.replace is atomic)."""
    handle, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp's 0600 would follow the file into a shared checkpoints folder
    return Path(name)


# ------------------------------------------------------------------------------------------------ synth


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
    # ENet.pth holds ENet's own keys only (its manifest scope): its L-Net always comes from LNet.pth.
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

    if spec.name == "expression.mat":
        variables = {
            k: deterministic_tensor(k, (1, 64), torch.float64).numpy()
            for k in ("expression_center", "expression_mouth")
        }
    else:
        variables = {"lm": deterministic_tensor("lm", (68, 3), torch.float32).numpy()}
    with tmp.open("wb") as handle:
        scipy.io.savemat(handle, variables)


def _write_fan(spec: CheckpointSpec, tmp: Path) -> None:
    try:
        writer = importlib.import_module("retalk.models.fan").write_synthetic_archive
    except (ImportError, AttributeError):
        raise _Skip(
            f"{spec.name}: skipped, retalk.models.fan.write_synthetic_archive is not available"
        ) from None
    writer(tmp)


class _Skip(Exception):
    """A file `synth` cannot write here; reported, not fatal."""


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
    write is never overwritten (CheckpointError), so real checkpoints are safe. Files that cannot
    be synthesised (the dlib model; FAN before its writer exists) are reported through ``report`` and left
    out of the returned paths.
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
            tmp = _temp_beside(path)
            try:
                writer(spec, tmp)
            except _Skip as skip:
                if report:
                    report(str(skip))
                continue
            except BaseException:
                tmp.unlink(missing_ok=True)  # never leave half a file behind
                raise
            os.replace(tmp, path)
            stat = path.stat()
            stamps[spec.name] = {"fill": _fill_id(spec), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            stamp_tmp = _temp_beside(dest / SYNTH_STAMP)
            stamp_tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True))
            os.replace(stamp_tmp, dest / SYNTH_STAMP)
        paths.append(path)
    return paths

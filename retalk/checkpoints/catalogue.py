"""The official checkpoint files: what each one is, where it comes from, and where retalk looks for it.

Every file name is written here once, as a constant; the rest of the code refers to the constant. Each
:class:`CheckpointSpec` names the loader that builds its network (``"module:function"``, imported on use,
so this module never pays for torch). The PyTorch files' container layout and every key and shape of
their state dicts are compact data in ``retalk/data/checkpoints.json.gz``, derived from the reference
manifests.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.resources
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from retalk.errors import CheckpointError

RELEASE = "https://github.com/vinthony/video-retalking/releases/download/v0.0.1/"
FACE_ALIGNMENT = "https://www.adrianbulat.com/downloads/python-fan/"
ENV_VAR = "RETALK_CHECKPOINTS"

# The official file names (BFM's is a path inside the checkpoints folder, as the reference lays it out).
LNET = "LNet.pth"
ENET = "ENet.pth"
DNET = "DNet.pt"
FACE3D = "face3d_pretrain_epoch_20.pth"
GFPGAN = "GFPGANv1.3.pth"
GPEN = "GPEN-BFR-512.pth"
PARSENET = "ParseNet-latest.pth"
RETINAFACE = "RetinaFace-R50.pth"
S3FD = "s3fd-619a316812.pth"
FAN = "2DFAN4-cd938726ad.zip"
EXPRESSION = "expression.mat"
BFM_LANDMARKS = "BFM/similarity_Lm3D_all.mat"
GANIMATION = "30_net_gen.pth"
DLIB_LANDMARKS = "shape_predictor_68_face_landmarks.dat"


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


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """One official file. ``size``/``sha256`` are None where the exact value is not known to us."""

    name: str  # official file name (a path relative to the checkpoints folder for BFM)
    url: str
    loader: str  # "module:function" that builds the network from the file, imported on use
    kind: str  # "torch" | "mat" | "torchscript" | "dlib"
    about: str  # approximate size for `retalk models list`, not a check
    purpose: str
    required: bool = False  # needed by the neural engine by default
    # optional, yet a plain `retalk models fetch` gets it (used when present)
    fetched_by_default: bool = False
    reads_also: tuple[str, ...] = ()  # further official files the loader takes, in order, after this one
    in_archive: bool = False  # ``url`` is a zip; the file is its member of the same base name
    # .mat: variable name -> (rows, min columns)
    variables: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    variable_dtype: str = "float64"  # .mat: what the rule-filled stand-in stores
    size: int | None = None
    sha256: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """The official files the loader takes, in its argument order."""
        return (self.name, *self.reads_also)

    @property
    def archive_member(self) -> str | None:
        return Path(self.name).name if self.in_archive else None

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
            name=LNET,
            url=RELEASE + LNET,
            loader="retalk.models.lnet:load_lnet",
            kind="torch",
            about="1.53 GB",
            purpose="L-Net: lip-sync at 96x96",
            required=True,
        ),
        CheckpointSpec(
            name=ENET,
            url=RELEASE + ENET,
            loader="retalk.models.enet:load_enet",
            kind="torch",
            about="573 MB",
            purpose="E-Net: lip-sync enhancement at 384x384",
            required=True,
            reads_also=(LNET,),  # ENet.pth holds E-Net's own layers; its L-Net comes from LNet.pth
        ),
        CheckpointSpec(
            name=DNET,
            url=RELEASE + DNET,
            loader="retalk.models.dnet:load_dnet",
            kind="torch",
            about="180 MB",
            purpose="D-Net: expression-neutral reference frames",
            required=True,
        ),
        CheckpointSpec(
            name=FACE3D,
            url=RELEASE + FACE3D,
            loader="retalk.models.face3d:load_face3d",
            kind="torch",
            about="289 MB",
            purpose="3DMM coefficients (Deep3DFaceRecon ResNet-50)",
            required=True,
        ),
        CheckpointSpec(
            name=GFPGAN,
            url=RELEASE + GFPGAN,
            loader="retalk.models.gfpgan:load_gfpgan",
            kind="torch",
            about="349 MB",
            purpose="GFPGAN face restoration",
            required=True,
        ),
        CheckpointSpec(
            name=GPEN,
            url=RELEASE + GPEN,
            loader="retalk.models.gpen:load_gpen",
            kind="torch",
            about="284 MB",
            purpose="GPEN reference enhancement",
            required=True,
        ),
        CheckpointSpec(
            name=PARSENET,
            url=RELEASE + PARSENET,
            loader="retalk.models.parsing:load_parsenet",
            kind="torch",
            about="85 MB",
            purpose="face parsing (mouth mask)",
            required=True,
        ),
        CheckpointSpec(
            name=RETINAFACE,
            url=RELEASE + RETINAFACE,
            loader="retalk.models.retinaface:load_retinaface",
            kind="torch",
            about="109 MB",
            purpose="GPEN's face detector",
            # optional: the neural engine reuses the track instead of detecting again
        ),
        CheckpointSpec(
            name=S3FD,
            url=FACE_ALIGNMENT + S3FD,
            loader="retalk.models.s3fd:load_s3fd",
            kind="torch",
            about="90 MB",
            purpose="S3FD face detector: the neural engine's face boxes (else dlib's)",
            fetched_by_default=True,  # the reference's detector, as the reference downloads it
        ),
        CheckpointSpec(
            name=FAN,
            url=FACE_ALIGNMENT + FAN,
            loader="retalk.models.fan:load_fan",
            kind="torchscript",
            about="96 MB",
            purpose="FAN 68-point landmarks (face-alignment, TorchScript): the neural engine's (else dlib's)",
            fetched_by_default=True,
        ),
        CheckpointSpec(
            name=EXPRESSION,
            url=RELEASE + EXPRESSION,
            loader="scipy.io:loadmat",
            kind="mat",
            about="1.4 KB",
            purpose="expression templates (neutral, smile)",
            required=True,
            variables={"expression_center": (1, 64), "expression_mouth": (1, 64)},
        ),
        CheckpointSpec(
            name=BFM_LANDMARKS,
            url=RELEASE + "BFM.zip",
            loader="retalk.align:load_lm3d",
            kind="mat",
            about="1 KB (in BFM.zip)",
            purpose="BFM 68-point 3D landmark template",
            # optional: its 5-point reduction is retalk.align.LM3D_STD (checked against the golden data)
            in_archive=True,
            variables={"lm": (68, 3)},
            variable_dtype="float32",
        ),
        CheckpointSpec(
            name=GANIMATION,
            url=RELEASE + GANIMATION,
            loader="retalk.models.ganimation:load_ganimation",
            kind="torch",
            about="34 MB",
            purpose="GANimation upper-face edit (--upper-face only)",
        ),
        CheckpointSpec(
            name=DLIB_LANDMARKS,
            url=RELEASE + DLIB_LANDMARKS,
            loader="dlib:shape_predictor",
            kind="dlib",
            about="100 MB",
            purpose="dlib 68-point landmarks (the tracker also finds it in face_recognition_models)",
        ),
    )
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


def missing_checkpoints(checkpoints_dir: str | Path | None = None, *, upper_face: bool = False) -> list[str]:
    """Names of the files the neural engine needs that are not in any search folder (existence only)."""
    dirs = search_dirs(checkpoints_dir)
    wanted = [s for s in CHECKPOINTS.values() if s.required or (upper_face and s.name == GANIMATION)]
    return [s.name for s in wanted if not any((d / s.name).is_file() for d in dirs)]


def file_identity(path: str | Path) -> str:
    """Name, size and modification time of a file: what a cache key needs to notice a replaced checkpoint."""
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def resolve_loader(spec: CheckpointSpec) -> Callable[..., Any]:
    """Import the loader named by ``spec.loader`` ("module:function")."""
    module, _, function = spec.loader.partition(":")
    return getattr(importlib.import_module(module), function)

"""The official checkpoint files and the networks built from them.

:mod:`~retalk.checkpoints.catalogue` lists the files (name, source, loader, layout) and where retalk looks for
them; :mod:`~retalk.checkpoints.verify` checks them without reading their tensors;
:mod:`~retalk.checkpoints.download` fetches them with resume; :mod:`~retalk.checkpoints.synth` writes
rule-filled stand-ins for the tests and ``retalk selftest``. :func:`load` is how the rest of retalk gets a
network: found, built by the loader beside its model (``retalk.models.<net>.load_<net>``), once per process.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retalk.checkpoints.catalogue import (
    CHECKPOINTS,
    ENV_VAR,
    CheckpointSpec,
    Container,
    default_checkpoints_dir,
    file_identity,
    find_checkpoint,
    get_spec,
    missing_checkpoints,
    resolve_loader,
    search_dirs,
)
from retalk.checkpoints.download import fetch
from retalk.checkpoints.synth import SYNTH_STAMP, is_synthetic, synth
from retalk.checkpoints.verify import VerifyResult, verify, verify_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINTS",
    "ENV_VAR",
    "SYNTH_STAMP",
    "CheckpointSpec",
    "Container",
    "VerifyResult",
    "clear_loaded",
    "default_checkpoints_dir",
    "fetch",
    "file_identity",
    "find_checkpoint",
    "get_spec",
    "is_synthetic",
    "load",
    "load_once",
    "missing_checkpoints",
    "resolve_loader",
    "search_dirs",
    "synth",
    "verify",
    "verify_file",
]

NETWORK_KINDS = ("torch", "torchscript")  # the files :func:`load` builds a network from
_LOADING = threading.Lock()  # one load at a time: two threads asking for one network build it once


@functools.lru_cache(maxsize=16)
def _loaded(
    loader: Callable[..., Any], paths: tuple[Path, ...], identities: tuple[str, ...], device: str
) -> Any:
    """``identities`` (name, size, modification time of each file) make a replaced checkpoint load afresh."""
    return loader(*paths, device=device)


def _load_paths(loader: Callable[..., Any], paths: tuple[Path, ...], device: torch.device | str) -> Any:
    with _LOADING:
        return _loaded(loader, paths, tuple(file_identity(p) for p in paths), str(device))


def load(name: str, checkpoints_dir: str | Path | None = None, *, device: torch.device | str = "cpu") -> Any:
    """The network of the official file ``name`` (e.g. :data:`~retalk.checkpoints.catalogue.ENET`) on
    ``device``: its files found in :func:`search_dirs`, built by the loader the catalogue names, in eval mode.

    Each network is built once per process, file identity and device (a render server's workers keep them
    warm); the precision is not part of the key, because autocast applies it when the network runs.
    """
    spec = get_spec(name)
    if spec.kind not in NETWORK_KINDS:
        raise ValueError(f"{name} is a {spec.kind} file, not a network; find_checkpoint gives its path")
    paths = tuple(find_checkpoint(n, checkpoints_dir) for n in spec.files)
    return _load_paths(resolve_loader(spec), paths, device)


def load_once(loader: Callable[..., Any], path: str | Path, device: torch.device | str = "cpu") -> Any:
    """``loader(path, device=device)`` through the same per-process cache as :func:`load`, for a caller that
    holds the file's path already (the tracker's detector and landmark networks)."""
    return _load_paths(loader, (Path(path),), device)


def clear_loaded() -> None:
    """Forget every network :func:`load` built (their memory is freed once no caller holds them)."""
    with _LOADING:
        _loaded.cache_clear()

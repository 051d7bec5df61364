"""Reading official checkpoint files and loading them into the project's modules, loudly.

Every network module has a ``checkpoint_filter_fn(state_dict, model)`` (timm's pattern) that turns the
official container's tensors into the module's own key names, and a ``load_<net>(path, device)`` that
calls :func:`read_checkpoint` and :func:`build_checked` below. Where the reference loads with
``strict=False``, retalk still reports every missing or unexpected key instead of keeping random weights.
"""

from __future__ import annotations

import functools
import pickle
import types
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from retalk.errors import CheckpointError

Module = TypeVar("Module", bound=torch.nn.Module)

# Modules no checkpoint needs anything from: a file that names one is refused outright (everything else
# unknown is already made inert by the restricted reader; this only says clearly that the file was tampered with).
_REFUSED_MODULES = frozenset({"os", "posix", "nt", "sys", "subprocess", "builtins", "importlib", "runpy"})


class SkippedObject:
    """What the restricted reader leaves where a file holds an object of a class or function torch's weights-only
    loader does not trust (training state beside the weights: numpy scalars, argparse Namespaces, custom classes).

    One subclass per original name (``origin``); instances accept every pickle operation and keep nothing,
    so no code from the file runs and none of its data is interpreted.
    """

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> SkippedObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:  # a list subclass's items
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.origin}>"


@functools.cache
def _skipped(origin: str) -> type[SkippedObject]:
    return type(origin.rpartition(".")[2] or "Skipped", (SkippedObject,), {"origin": origin})


class _RefusedGlobal(pickle.UnpicklingError):
    """The file names a function of a module no checkpoint needs (os.system and the like)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what torch's own weights-only loader trusts (tensor and storage rebuilding, dtypes,
    OrderedDict); any other class or function becomes an inert :class:`SkippedObject` subclass."""

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import _get_allowed_globals  # torch's own allowlist

        trusted = _get_allowed_globals().get(f"{module}.{name}")
        if trusted is not None:
            return trusted
        if module.partition(".")[0] in _REFUSED_MODULES:
            raise _RefusedGlobal(f"{module}.{name}")
        return _skipped(f"{module}.{name}")


# A stand-in for the ``pickle`` module that torch.load accepts as ``pickle_module``
_restricted_pickle = types.ModuleType("retalk_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]


_UNREADABLE = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
)  # what torch raises for a bad file


def _corrupt(name: str, path: Path, err: BaseException) -> CheckpointError:
    detail = str(err).splitlines()[0] if str(err) else "no detail"
    return CheckpointError(
        f"{name}: {path} is truncated or not a PyTorch checkpoint ({type(err).__name__}: {detail[:160]}); "
        "delete it and run `retalk models fetch`"
    )


def load_torch_file(path: str | Path, *, name: str) -> Any:
    """Everything ``path`` holds, tensors on the CPU (memory-mapped when the file is a zip archive, so the
    training state some official files carry beside the weights costs no memory), without running code from it.

    ``torch.load(weights_only=True)`` first; a file that also holds objects it refuses (numpy scalars, argparse
    Namespaces, custom classes: training state) is read again with a restricted reader that trusts exactly what
    torch's weights-only loader trusts and leaves an inert :class:`SkippedObject` for everything else. A file
    that names ``os.system`` or the like is refused; a damaged one is reported as such.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{name}: no file at {path}; run `retalk models fetch` or pass --checkpoints DIR"
        )
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass  # objects beside the weights that weights_only refuses, or a damaged pickle: the reader below tells
    except _UNREADABLE as err:
        raise _corrupt(name, path, err) from err
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_restricted_pickle
        )
    except _RefusedGlobal as err:
        raise CheckpointError(
            f"{name}: {path} refers to {err}, which no checkpoint needs (retalk never runs code from a "
            "checkpoint); delete it and run `retalk models fetch`"
        ) from None
    except (*_UNREADABLE, pickle.UnpicklingError, TypeError, AttributeError) as err:
        raise _corrupt(name, path, err) from err


def read_checkpoint(
    path: str | Path, *, name: str, container_keys: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The state dict of ``path``: its first of ``container_keys`` (or the file itself), all tensors.

    ``name`` is the official file name (a constant of :mod:`retalk.checkpoints.catalogue`), used in every
    error message. Whatever else the file holds (optimizer state, training arguments) is ignored
    (:func:`load_torch_file`).
    """
    obj = load_torch_file(path, name=name)
    container_keys = tuple(container_keys)
    wanted = " or ".join(repr(k) for k in container_keys) or "a plain state dict"
    if isinstance(obj, Mapping):
        for key in container_keys:
            if isinstance(obj.get(key), SkippedObject):
                raise CheckpointError(
                    f"{name}: {path} holds a {obj[key].origin} object under {key!r} where the weights "
                    "should be; is it the right file?"
                )
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{name}: {path} does not hold {wanted} of tensors; is it the right file?")
    return dict(obj)


@dataclass
class LoadReport:
    """What a checkpoint load matched: keys the model wanted but the file lacked, and the reverse."""

    name: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {few(self.unexpected)}")
        return f"{self.name}: " + ("; ".join(parts) if parts else "all keys matched")


def build_checked(
    build: Callable[[], Module],
    state_dict: Mapping[str, torch.Tensor],
    filter_fn: Callable[[Mapping[str, torch.Tensor], Module], Mapping[str, torch.Tensor]],
    *,
    name: str,
    allow_unexpected: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Module, LoadReport]:
    """``build()`` filled with ``filter_fn(state_dict, model)`` on ``device``, in eval mode, and what matched.

    The module is built on the meta device and materialised empty, so no time goes into drawing random
    weights the file overwrites. Any missing key or shape mismatch is a CheckpointError, and so is an
    unexpected key unless ``allow_unexpected`` (files known to carry entries the network does not use; the
    report lists them).
    """
    with torch.device("meta"):
        model = build()
    own = model.state_dict()
    tensors = {key for key, _ in (*model.named_parameters(), *model.named_buffers())}
    if unfilled := sorted(tensors - set(own)):  # to_empty would leave them uninitialised
        raise RuntimeError(f"{type(model).__name__} has tensors outside its state dict: {unfilled[:3]}")
    state_dict = filter_fn(state_dict, model)
    report = LoadReport(
        name=name,
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
    )
    bad_shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise CheckpointError(
            f"{name}: {len(bad_shapes)} tensor(s) have the wrong shape (first: {bad_shapes[0]}); "
            "is this the right file for this network?"
        )
    if report.missing or (report.unexpected and not allow_unexpected):
        raise CheckpointError(report.summary() + "; is this the right file for this network?")
    model.to_empty(device=device)
    model.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return model.eval(), report

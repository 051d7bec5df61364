"""Reading official checkpoint files and loading them into the project's modules, loudly.

Every network module has a ``checkpoint_filter_fn(state_dict, model)`` (timm's pattern) that turns the
official container's tensors into the module's own key names, and a ``load_<net>(path, device)`` that
calls :func:`read_checkpoint` and :func:`load_state_dict_checked` below. Where the reference loads with
``strict=False``, retalk still reports every missing or unexpected key instead of keeping random weights.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retalk.errors import CheckpointError


def read_checkpoint(
    path: str | Path, *, name: str, container_keys: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Load ``path`` on the CPU (weights only) and unwrap the first of ``container_keys`` it holds.

    ``name`` is the official file name (e.g. ``"LNet.pth"``), used in every error message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{name}: no file at {path}; run `retalk models fetch` or pass --checkpoints DIR"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"{name}: {path} is truncated or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); delete it and run `retalk models fetch`"
        ) from err
    container_keys = tuple(container_keys)
    if isinstance(obj, Mapping):
        for key in container_keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wanted = " or ".join(repr(k) for k in container_keys) or "a plain state dict"
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


def load_state_dict_checked(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str,
    allow_unexpected: bool = False,
) -> LoadReport:
    """Copy ``state_dict`` into ``model``; any missing key, shape mismatch (or unexpected key) is an error.

    ``allow_unexpected`` is for files known to carry extra entries the network does not use; they are
    still listed in the returned report.
    """
    own = model.state_dict()
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
    model.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return report

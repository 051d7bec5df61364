"""Deterministic synthetic weights: the weight rule the reference's golden outputs were made with.

The rule fills every tensor of a state dict from its reference key and shape alone, so networks can be checked
against the golden outputs (``retalk selftest``) without the official files. Each key seeds a CPU
``torch.Generator`` with ``crc32(key)``; the values must match the reference generator bit for bit, which is why
the float32 arithmetic below is spelled out exactly. A manifest entry may carry options (a gain, a constant
buffer, spectral-norm vectors) where the plain rule would leave a network saturated or input-independent.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

Entry = Sequence[Any]  # [key, shape, dtype] or [key, shape, dtype, options]


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"torch.float32"`` or a torch dtype -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[str(dtype).removeprefix("torch.")]


def _seeded(key: str) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(key.encode("utf-8")))
    return generator


def deterministic_tensor(
    key: str, shape: Sequence[int], dtype: str | torch.dtype = torch.float32, gain: float = 1.0
) -> torch.Tensor:
    """The base rule: the tensor for state-dict entry ``key`` (a reference key) of ``shape``."""
    dtype = to_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.zeros(shape, dtype=dtype)  # num_batches_tracked and other counters
    generator = _seeded(key)
    if key.endswith("running_var"):
        values = 1 + 0.1 * torch.rand(shape, generator=generator, dtype=torch.float32)
    elif key.endswith("running_mean"):
        values = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float32)
    elif len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * (gain / math.sqrt(fan_in))
    elif len(shape) == 1:
        draw = torch.randn(shape, generator=generator, dtype=torch.float32)
        values = 1 + 0.1 * draw if key.endswith("weight") else 0.01 * draw
    else:
        values = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float32)
    return values.to(dtype)


def noise_tensor(name: str, shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal float32 noise seeded by ``crc32(name)`` (explicit StyleGAN noise inputs)."""
    return torch.randn(tuple(int(s) for s in shape), generator=_seeded(name), dtype=torch.float32)


def _unit_randn(key: str, shape: Sequence[int], dtype: str | torch.dtype) -> torch.Tensor:
    """Spectral-norm ``weight_u``: the key's randn draw scaled to unit L2 norm (in float64)."""
    draw = torch.randn(tuple(int(s) for s in shape), generator=_seeded(key), dtype=torch.float32).double()
    return (draw / draw.norm()).to(to_dtype(dtype))


def _spectral_v(weight: torch.Tensor, u: torch.Tensor, dim: int, dtype: str | torch.dtype) -> torch.Tensor:
    """Spectral-norm ``weight_v`` = normalize(W_mat^T u), W_mat = ``weight`` with ``dim`` first, as 2-D."""
    matrix = weight.double().movedim(dim, 0)
    matrix = matrix.reshape(matrix.shape[0], -1)
    v = torch.mv(matrix.t(), u.double())
    return (v / v.norm()).to(to_dtype(dtype))


def deterministic_state_dict(entries: Iterable[Entry] | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Fill manifest ``entries`` (or a whole manifest with an ``"entries"`` list) in manifest order.

    Options (4th element): ``gain``, ``const`` (a constructor buffer), ``init: unit_randn`` and
    ``init: spectral_v`` (derived from two other entries, so computed after everything else).
    """
    if isinstance(entries, Mapping):
        entries = entries["entries"]
    state: dict[str, torch.Tensor | None] = {}
    derived: list[tuple[str, tuple[int, ...], str, Mapping[str, Any]]] = []
    for entry in entries:
        key, shape, dtype = entry[0], tuple(int(s) for s in entry[1]), entry[2]
        options = entry[3] if len(entry) > 3 and entry[3] else {}
        init = options.get("init")
        if init == "spectral_v":
            state[key] = None  # placeholder keeps the manifest order
            derived.append((key, shape, dtype, options))
        elif init == "unit_randn":
            state[key] = _unit_randn(key, shape, dtype)
        elif "const" in options:
            const = torch.tensor(options["const"], dtype=torch.float64).reshape(shape)
            state[key] = const.to(to_dtype(dtype))
        else:
            state[key] = deterministic_tensor(key, shape, dtype, gain=float(options.get("gain", 1.0)))
    for key, shape, dtype, options in derived:
        v = _spectral_v(state[options["weight"]], state[options["u"]], int(options.get("dim", 0)), dtype)
        if tuple(v.shape) != shape:
            raise ValueError(
                f"spectral_v entry {key}: derived shape {tuple(v.shape)} != manifest shape {shape}"
            )
        state[key] = v
    return state  # type: ignore[return-value]  # every placeholder is filled above


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and raw little-endian bytes."""
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256()
    digest.update(str(tensor.dtype).encode())
    digest.update(str(tuple(tensor.shape)).encode())
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)  # numpy has no bfloat16
    digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, tensor_sha256) of every entry, in order: the manifests' ``fill_sha256``."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        digest.update(key.encode("utf-8"))
        digest.update(tensor_sha256(tensor).encode())
    return digest.hexdigest()

"""Device choice: CUDA when present and asked for, CPU always."""

import torch

from retalk.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """Map the CLI's ``auto|cpu|cuda[:N]`` to a torch device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        return torch.device(name)
    raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")

"""Where the shared verification data is (the reference's golden outputs, manifests and timings; test media):
only where ``$RETALK_SHARED`` says. Nothing is derived from where retalk is installed or checked out."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "RETALK_SHARED"


def shared_dir() -> Path:
    """The folder ``$RETALK_SHARED`` names. While it is unset the path is spelled ``$RETALK_SHARED`` itself: it
    exists nowhere, so whatever reports a file of it as missing also names the setting to make."""
    return Path(os.environ.get(ENV_VAR) or f"${ENV_VAR}")

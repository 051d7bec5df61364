"""Where the shared reference data and test media live: ``../shared`` beside the checkout, or ``$RETALK_SHARED``."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    return Path(os.environ.get("RETALK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

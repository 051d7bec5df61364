"""Shared fixtures: where ../shared is, and media the tests make themselves.

Tests that need ../shared skip with the reason when it is absent; everything else makes its own data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETALK_SHARED", REPO.parent / "shared"))


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the shared reference data (../shared beside the repo)"
        )
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference: manifests, detweights.py, golden outputs, PIPELINE.md."""
    return _shared_path("reference")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _shared_path("reference", "golden")


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """../shared/media: face1.mp4 (1350/61 fps), face2.mp4 (25 fps), speech1.wav."""
    return _shared_path("media")

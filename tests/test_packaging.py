"""The installed packages are every package of the source tree: pyproject.toml lists them by name (the folders
install under other names), so a new subpackage that is not listed works in an editable install and is missing
from a wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if not any(part.startswith((".", "__")) for part in parts):
                found.add(".".join((name, *parts)))
    assert found - listed == set(), (
        f"packages missing from pyproject.toml [tool.setuptools] packages: {found - listed}"
    )
    assert listed - found == set(), f"listed packages without a folder: {listed - found}"

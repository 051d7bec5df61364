"""Build the Blender extension zip: plugins/blender_vse + the wheels it runs on.

`blender --command extension build` is not available here, so this does its job: build the retalk_protocol
wheel from this repository's protocol/ (the add-on never carries a copy of it in git), download the pyzmq and
msgpack wheels (the versions pinned in pyproject.toml) for each target Python and platform with `pip download`,
list them in the manifest's ``wheels`` and ``platforms``, and zip it all.

    python tools/build_blender_extension.py -o dist [--python 3.11 --python 3.13] [--platform linux-x64 ...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "plugins" / "blender_vse"
BUNDLED = ("pyzmq", "msgpack")
# Blender 4.2-5.0 embed Python 3.11, 5.1+ Python 3.13.
PYTHONS = ("3.11", "3.13")
# Blender platform names -> pip platform tags wheels of these packages are published under.
PLATFORM_TAGS = {
    "linux-x64": [
        "manylinux_2_28_x86_64",
        "manylinux_2_26_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64", "macosx_10_15_universal2", "macosx_10_9_universal2"],
    "macos-x64": [
        "macosx_10_15_x86_64",
        "macosx_10_9_x86_64",
        "macosx_10_15_universal2",
        "macosx_10_9_universal2",
    ],
}
_SKIP = re.compile(r"(__pycache__|\.pyc$|\.zip$)")


def pinned_requirements() -> list[str]:
    """The bundled packages' pins from pyproject.toml, e.g. ``pyzmq==27.3.0``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [dep for dep in project["dependencies"] if re.split(r"[=<>!~ ]", dep, maxsplit=1)[0] in BUNDLED]
    if len(pins) != len(BUNDLED):
        raise SystemExit(f"pyproject.toml does not pin all of {', '.join(BUNDLED)}")
    return pins


def build_protocol_wheel(wheels: Path) -> Path:
    """A pure-Python retalk_protocol wheel of protocol/, written directly in the wheel format (PEP 427): no
    build backend, so it works in any venv (a fresh 3.11 venv's setuptools is too old to build one offline)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dist_info = f"retalk_protocol-{version}.dist-info"
    files = {
        f"retalk_protocol/{path.relative_to(ROOT / 'protocol').as_posix()}": path.read_bytes()
        for path in sorted((ROOT / "protocol").rglob("*"))
        if path.is_file() and path.suffix in (".py", ".md") and "__pycache__" not in path.parts
    }
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: retalk-protocol\nVersion: {version}\nRequires-Python: >=3.8\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: retalk build_blender_extension\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    wheel = wheels / f"retalk_protocol-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def download_wheels(wheels: Path, pythons: list[str], platforms: list[str]) -> None:
    for python in pythons:
        abi = "cp" + python.replace(".", "")
        for platform in platforms:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
            command += ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
            for tag in PLATFORM_TAGS[platform]:
                command += ["--platform", tag]
            subprocess.run([*command, "-d", str(wheels), *pinned_requirements()], check=True)


def build(output: Path, pythons: list[str], platforms: list[str]) -> Path:
    manifest_text = (ADDON / "blender_manifest.toml").read_text()
    manifest = tomllib.loads(manifest_text)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp)
        build_protocol_wheel(wheels)
        download_wheels(wheels, pythons, platforms)
        names = sorted(path.name for path in wheels.glob("*.whl"))
        listed = ", ".join(f'"./wheels/{name}"' for name in names)
        filled = f"wheels = [{listed}]\nplatforms = [" + ", ".join(f'"{p}"' for p in platforms) + "]"
        manifest_text, count = re.subn(r"(?m)^wheels = \[\]$", filled, manifest_text)
        if count != 1:
            raise SystemExit(
                "blender_manifest.toml needs exactly one top-level line `wheels = []` to fill in"
            )
        output.mkdir(parents=True, exist_ok=True)
        archive = output / f"{manifest['id']}-{manifest['version']}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("blender_manifest.toml", manifest_text)
            for path in sorted(ADDON.rglob("*")):
                relative = path.relative_to(ADDON).as_posix()
                if path.is_file() and relative != "blender_manifest.toml" and not _SKIP.search(relative):
                    zf.write(path, relative)
            for name in names:
                zf.write(wheels / name, f"wheels/{name}")
    return archive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "dist", help="folder for the zip")
    parser.add_argument("--python", action="append", choices=PYTHONS, help="target Python (repeatable)")
    parser.add_argument("--platform", action="append", choices=sorted(PLATFORM_TAGS), help="(repeatable)")
    args = parser.parse_args()
    archive = build(args.output, args.python or list(PYTHONS), args.platform or sorted(PLATFORM_TAGS))
    print(archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Downloading the official files: resumed with HTTP Range requests, checked before they are put in place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from retalk.checkpoints.catalogue import CHECKPOINTS, CheckpointSpec, get_spec, search_dirs
from retalk.checkpoints.verify import verify_file
from retalk.errors import CheckpointError


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, *, label: str, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, resuming from its current length with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(
        url, headers={"User-Agent": "retalk", **({"Range": f"bytes={have}-"} if have else {})}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already complete; the checks below decide
            return
        raise CheckpointError(
            f"{label}: {url} answered HTTP {err.code} {err.reason}; check the URL or download it by hand into the checkpoints folder"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CheckpointError(
            f"{label}: cannot reach {url} ({reason}); check the network (or download it by hand into the checkpoints folder)"
        ) from None
    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        with (
            part.open("ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=label,
                disable=not progress,
            ) as bar,
        ):
            try:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            except OSError as err:  # connection lost: keep the .part for the next run to resume
                raise CheckpointError(
                    f"{label}: download interrupted ({err}); run the same command again to resume"
                ) from None


def fetch(
    names: Iterable[str] | None = None,
    dest: str | Path | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> list[Path]:
    """Download official files (default: the required ones and the reference's face detector and landmark
    network, which the neural engine uses when present) into ``dest`` (default: the first search folder).

    Files already present are kept. Each download goes to ``<file>.part`` (resumed if a previous run was
    cut short), is checked against the known size/sha256, and is renamed into place only when complete.
    """
    dest = Path(dest).expanduser() if dest is not None else search_dirs()[0]
    specs = (
        [get_spec(n) for n in names]
        if names is not None
        else [s for s in CHECKPOINTS.values() if s.default_download]
    )
    paths = []
    for spec in specs:
        target = dest / spec.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            download = target.with_name(Path(spec.url).name) if spec.archive_member else target
            part = download.with_name(download.name + ".part")
            _download(spec.url, part, label=spec.name, progress=progress, timeout=timeout)
            _check_download(part, spec)
            candidate = _extract_member(part, spec, target) if spec.archive_member else part
            result = verify_file(candidate, spec.name)
            if not result.ok:  # e.g. an HTML error page served with status 200
                candidate.unlink(missing_ok=True)
                part.unlink(missing_ok=True)
                raise CheckpointError(
                    f"{spec.name}: the download from {spec.url} is not a usable file ({result.status}); "
                    "removed it; check the URL or download it by hand into the checkpoints folder"
                )
            os.replace(candidate, target)
            part.unlink(missing_ok=True)
        paths.append(target)
    return paths


def _check_download(part: Path, spec: CheckpointSpec) -> None:
    size = part.stat().st_size
    problem = None
    if spec.size is not None and size != spec.size:
        problem = f"has {size} bytes, expected {spec.size}"
    elif spec.sha256 is not None and (digest := _sha256_file(part)) != spec.sha256:
        problem = f"sha256 {digest[:12]}... does not match {spec.sha256[:12]}..."
    if problem:
        part.unlink()
        raise CheckpointError(
            f"{spec.name}: the download from {spec.url} {problem}; deleted it, run `retalk models fetch {spec.name}` again"
        )


def _extract_member(archive_path: Path, spec: CheckpointSpec, target: Path) -> Path:
    """Copy ``spec.archive_member`` (matched by file name anywhere in the zip) beside ``target``."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            member = next((m for m in archive.namelist() if Path(m).name == spec.archive_member), None)
            if member is None:
                archive_path.unlink()
                raise CheckpointError(
                    f"{spec.name}: {spec.url} has no {spec.archive_member}; download it by hand into {target.parent}"
                )
            tmp = temp_beside(target)
            with archive.open(member) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
            return tmp
    except zipfile.BadZipFile:
        archive_path.unlink()
        raise CheckpointError(
            f"{spec.name}: the download from {spec.url} is not a zip; run `retalk models fetch {spec.name}` again"
        ) from None


def temp_beside(path: Path) -> Path:
    """A fresh temporary file in ``path``'s folder (same file system, so os.replace is atomic)."""
    handle, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp's 0600 would follow the file into a shared checkpoints folder
    return Path(name)

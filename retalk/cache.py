"""A size-bounded on-disk cache for video-only stage outputs, keyed by content, evicted least-recently-used.

Keys hash what a result depends on (the video's content: ``media.hash_packets``, parameters, code version),
never a file name: two different clips called ``input.mp4`` never share an entry (the reference keyed its
intermediate files by file name).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import platformdirs

DEFAULT_MAX_BYTES = 2 << 30
_KEY_NAME = re.compile(r"[0-9a-f]{64}(\.\w+)?$")  # "<sha256 hex><suffix>": what put() writes


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("retalk"))


def cache_key(*parts: object) -> str:
    """A stable key from strings/numbers (e.g. a content hash, parameters, a code version)."""
    return hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).hexdigest()


class ArtifactCache:
    """Files under ``root/<kind>/<key><suffix>``; at most ``max_bytes`` in total, oldest use evicted first."""

    def __init__(self, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def path(self, kind: str, key: str, suffix: str = ".npz") -> Path:
        return self.root / kind / f"{key}{suffix}"

    def get(self, kind: str, key: str, suffix: str = ".npz") -> Path | None:
        """The entry's path, marked as just used, or None."""
        path = self.path(kind, key, suffix)
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def put(self, kind: str, key: str, write: Callable[[Path], None], suffix: str = ".npz") -> Path:
        """Store an entry: ``write(tmp_path)`` writes it, then it is renamed into place (readers never see half
        a file; concurrent writers of the same key both end with a whole entry) and old entries are evicted."""
        path = self.path(kind, key, suffix)
        if not _KEY_NAME.match(path.name):
            raise ValueError(f"cache key {key!r}: expected a sha256 hex digest (see cache_key)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.evict(keep=path)
        return path

    def _entries(self) -> Iterable[os.DirEntry]:
        """This cache's entries: files named by a key. The root may be shared (the user cache also holds
        checkpoints), so nothing else in it is ever counted or evicted."""
        if not self.root.is_dir():
            return
        for kind in os.scandir(self.root):
            if kind.is_dir(follow_symlinks=False):
                yield from (e for e in os.scandir(kind.path) if e.is_file() and _KEY_NAME.match(e.name))

    def size(self) -> int:
        return sum(e.stat().st_size for e in self._entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least-recently-used entries until the cache fits ``max_bytes`` (``keep`` is never deleted)."""
        entries = sorted((e.stat().st_mtime_ns, e.stat().st_size, Path(e.path)) for e in self._entries())
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
        return removed

"""Client paths confined to the server's media roots (PROTOCOL.md §6.2)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from retalk_protocol.codec import ProtocolError


def confine(text: str, roots: list[Path]) -> Path:
    """The resolved file ``text`` names inside one of ``roots``; ProtocolError forbidden/not-found otherwise.

    Relative paths are taken relative to the first root. A ``..`` component is refused outright; the
    resolved path (every symlink followed) must still lie inside a resolved root, so a link cannot escape.
    """
    if not roots:
        raise ProtocolError("forbidden", "this server has no media roots: upload the file instead (§4.2)")
    if "\x00" in text or not text:
        raise ProtocolError("forbidden", "path is empty or contains a NUL byte")
    if ".." in PurePosixPath(text).parts or ".." in Path(text).parts:
        raise ProtocolError("forbidden", f"path {text!r} contains '..': give a path inside the media roots")
    path = Path(text)
    if not path.is_absolute():
        path = roots[0] / path
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        # A missing file outside the roots is still "forbidden": the answer must not probe the filesystem.
        if not any(_inside(path.absolute(), root) for root in roots):
            raise ProtocolError("forbidden", f"path {text!r} is outside the server's media roots") from None
        raise ProtocolError("not-found", f"no such file in the media roots: {text!r}") from None
    if not any(_inside(resolved, root) for root in roots):
        raise ProtocolError("forbidden", f"path {text!r} is outside the server's media roots")
    if not resolved.is_file():
        raise ProtocolError("not-found", f"{text!r} is not a file")
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents

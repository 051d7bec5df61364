"""Log lines a client cannot forge (PROTOCOL.md §8.5): everything a client supplies is escaped before it is
written, so it can neither start a line nor hide characters (ANSI escapes, NUL, bidirectional controls).

The server logs through one logger, ``retalk.server``; ``guard()`` puts a filter on it that escapes every
argument of every record (the format strings are the server's own) and indents tracebacks.
"""

from __future__ import annotations

import logging
import traceback

LOGGER = "retalk.server"
ARGUMENT_LIMIT = 300  # characters of one client-supplied value in a log line


def printable(value, limit: int | None = ARGUMENT_LIMIT) -> str:
    """``value`` as one line of visible characters: each character ``str.isprintable()`` refuses (line
    breaks, controls, format characters such as U+202E) as a ``\\x``/``\\u``/``\\U`` escape; cut to ``limit``."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class EscapeClientText(logging.Filter):
    """Escapes a record's arguments and message; a traceback becomes indented lines of visible characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(record.msg, limit=None)
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg if isinstance(arg, (int, float)) else printable(arg) for arg in record.args
            )
        elif record.args:  # one mapping argument
            record.args = {key: printable(value) for key, value in dict(record.args).items()}
        if record.exc_info and not record.exc_text:
            lines = "".join(traceback.format_exception(*record.exc_info)).splitlines()
            record.exc_text = "\n".join("    " + printable(line, limit=None) for line in lines)
        return True


def guard(logger: logging.Logger | None = None) -> logging.Logger:
    """The server's logger, with the escaping filter on it (once)."""
    logger = logger or logging.getLogger(LOGGER)
    if not any(isinstance(f, EscapeClientText) for f in logger.filters):
        logger.addFilter(EscapeClientText())
    return logger

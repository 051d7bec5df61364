"""Every failure as an RTP/1 error (PROTOCOL.md §7), classified in one place: requests answered with ERROR,
jobs ended ``failed``, streams cut short."""

from __future__ import annotations

from retalk_protocol.codec import ERROR_CODES, ProtocolError

from retalk.errors import CancelledError, CheckpointError, MediaError, RetalkError

INTERNAL_MESSAGE = "internal server error (logged); try again"


def error_code(exc: BaseException) -> str:
    """The §7 code of ``exc``: a protocol error's own; the pipeline's refusals by kind; anything else is a
    fault of the server (``internal``)."""
    if isinstance(exc, ProtocolError):
        return exc.code
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, CheckpointError):
        return "checkpoint"
    if isinstance(exc, MediaError):
        return "media"
    if isinstance(exc, RetalkError):  # InputError and any other refusal of the request as given
        return "invalid"
    return "internal"


def as_protocol_error(exc: BaseException) -> ProtocolError:
    """``exc`` as the ProtocolError a client is told; an internal fault says no more than that."""
    if isinstance(exc, ProtocolError):
        return exc
    code = error_code(exc)
    return ProtocolError(code, INTERNAL_MESSAGE if code == "internal" else str(exc))


def retried(code: str) -> bool:
    """Whether a job that failed with ``code`` is run again (§8.2): only a retryable fault, never a refusal."""
    return ERROR_CODES.get(code, False)

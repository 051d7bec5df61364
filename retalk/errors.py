"""Errors a user can act on. Every message is one line that says what is wrong and what to do."""


class RetalkError(Exception):
    """Base class: the CLI prints ``str(err)`` as its one-line reason and exits non-zero."""


class InputError(RetalkError):
    """A request that cannot be served as given (bad range, bad option, unusable audio)."""


class MediaError(RetalkError):
    """A media file that cannot be opened, decoded or written."""


class CheckpointError(RetalkError):
    """A checkpoint that is missing, truncated, of the wrong network, or with mismatching keys."""


class CancelledError(RetalkError):
    """The job was cancelled by its owner; nothing was written."""

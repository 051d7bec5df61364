"""RTP/1 codec: one msgpack header frame plus raw payload frames (PROTOCOL.md §3, §4, §7, §9).

Pure Python on msgpack only, valid on Python 3.8 (host applications import it). Every size is bounded before
it is allocated and every field is type-checked, so a hostile peer gets a ProtocolError, never a crash.
"""

from __future__ import annotations

from fractions import Fraction

import msgpack

VERSION = 1
SUPPORTED_VERSIONS = (1,)

MAX_HEADER_BYTES = 64 * 1024  # §6.1: a header is small; anything bigger is refused before decoding
_MAX_STR = 16 * 1024
_MAX_ARRAY = 4096
_MAX_MAP = 256

# §7: error codes and whether the same request may succeed later. `timeout` is client-side only.
ERROR_CODES = {
    "bad-message": False,
    "too-large": False,
    "unsupported-version": False,
    "unknown-type": False,
    "hello-required": False,
    "forbidden": False,
    "not-found": False,
    "invalid": False,
    "media": False,
    "checkpoint": False,
    "cancelled": False,
    "checksum": True,
    "busy": True,
    "not-ready": True,
    "expired": False,
    "failed": False,
    "internal": True,
    "timeout": True,
}

PIXEL_FORMATS = ("rgb8", "rgb16", "rgba-half")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "expired")
FINAL_STATES = ("done", "failed", "cancelled", "expired")


class ProtocolError(Exception):
    """A protocol-level failure with an RTP/1 error code (§7); ``str()`` is the one-line message."""

    def __init__(self, code: str, message: str, retryable: bool | None = None, req: int = 0, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = ERROR_CODES.get(code, False) if retryable is None else retryable
        self.req = req
        self.extra = extra


# Field kinds (§3.3); a trailing "?" also allows nil.
_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "map": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "ints": lambda v: isinstance(v, list) and all(_CHECKS["int"](x) for x in v),
    "strs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "rational": lambda v: (
        isinstance(v, list)
        and len(v) == 2
        and all(_CHECKS["int"](x) for x in v)
        and v[1] > 0
        and abs(v[0]) < 2**62
        and v[1] < 2**62
    ),
    "media": lambda v: (
        isinstance(v, dict)
        and len(v) == 1
        and (isinstance(v.get("path"), str) or isinstance(v.get("upload"), str))
    ),
}

# type -> (sender, required fields, optional fields, payload frames); §9 lists the same, §4 explains each.
# The sender is "client", "server" or "both"; a message from the wrong side is `unknown-type` there (§7.1).
SCHEMAS = {
    # §4.1
    "HELLO": ("client", {"versions": "ints"}, {"client": "str"}, 0),
    "WELCOME": (
        "server",
        {
            "version": "int",
            "server": "str",
            "engines": "strs",
            "formats": "strs",
            "codecs": "strs",
            "options": "list",
            "limits": "map",
            "heartbeat": "num",
            "timeout": "num",
            "retention": "num",
        },
        {},
        0,
    ),
    # §4.2
    "UPLOAD": ("client", {"name": "str", "size": "uint", "sha256": "str"}, {}, 0),
    "UPLOAD_READY": ("server", {"upload": "str", "chunk": "uint", "credit": "uint"}, {}, 0),
    "UPLOAD_CHUNK": ("client", {"upload": "str", "offset": "uint"}, {}, 1),
    "UPLOAD_ACK": ("server", {"upload": "str", "received": "uint"}, {}, 0),
    "UPLOADED": ("server", {"upload": "str", "size": "uint"}, {}, 0),
    # §4.3
    "SUBMIT": (
        "client",
        {"clip": "media", "audio": "media"},
        {
            "start": "uint",
            "end": "uint?",
            "rate": "rational?",
            "audio_offset": "rational",
            "engine": "str",
            "options": "map",
            "priority": "int",
        },
        0,
    ),
    "ACCEPTED": ("server", {"job": "str", "position": "uint"}, {}, 0),
    # §4.4
    "PROGRESS": (
        "server",
        {
            "job": "str",
            "state": "str",
            "stage": "str",
            "done": "uint",
            "total": "uint",
            "eta": "num?",
            "attempt": "uint",
            "error": "map?",
            "result": "map?",
        },
        {},
        0,
    ),
    # §4.5
    "WATCH": ("client", {"job": "str"}, {}, 0),
    "STATUS": ("client", {}, {}, 0),
    "STATUS_REPLY": (
        "server",
        {
            "server": "str",
            "queue": "strs",
            "workers": "list",
            "devices": "strs",
            "jobs": "map",
            "clients": "uint",
            "streams": "uint",
            "uptime": "num",
        },
        {},
        0,
    ),
    "LIST": ("client", {}, {"states": "strs", "job": "str", "limit": "uint"}, 0),
    "JOBS": ("server", {"jobs": "list", "more": "bool"}, {}, 0),
    "CANCEL": ("client", {"job": "str"}, {}, 0),
    "CANCELLED": ("server", {"job": "str", "state": "str"}, {}, 0),
    # §4.6, §4.7
    "RENDER": (
        "client",
        {"job": "str"},
        {
            "first": "uint?",
            "last": "uint?",
            "format": "str",
            "audio": "bool",
            "audio_rate": "uint",
            "credit": "uint",
        },
        0,
    ),
    "FETCH": ("client", {"job": "str"}, {"credit": "uint"}, 0),
    "STREAM": (
        "server",
        {"stream": "str", "job": "str", "credit": "uint"},
        {
            "first": "uint",
            "last": "uint",
            "frames": "uint",
            "width": "uint",
            "height": "uint",
            "rate": "rational",
            "format": "str",
            "size": "uint",
            "sha256": "str",
            "codec": "str",
            "extension": "str",
        },
        0,
    ),
    "AUDIO": (
        "server",
        {"stream": "str", "rate": "uint", "channels": "uint", "sample": "uint", "format": "str"},
        {},
        1,
    ),
    "FRAME": (
        "server",
        {
            "stream": "str",
            "index": "uint",
            "time": "rational",
            "width": "uint",
            "height": "uint",
            "format": "str",
        },
        {},
        1,
    ),
    "CHUNK": ("server", {"stream": "str", "offset": "uint"}, {}, 1),
    "END": ("server", {"stream": "str", "count": "uint"}, {}, 0),
    # §4.8
    "CREDIT": ("client", {"stream": "str", "credit": "uint"}, {}, 0),
    "ABORT": ("client", {"stream": "str"}, {}, 0),
    # §4.9
    "HEARTBEAT": ("both", {}, {}, 0),
    "BYE": ("client", {}, {}, 0),
    # §7
    "ERROR": ("server", {"code": "str", "message": "str", "retryable": "bool"}, {"supported": "ints"}, 0),
}


class Message:
    """A decoded message: its type, request number, header fields and raw payload frames."""

    __slots__ = ("type", "req", "fields", "payloads")

    def __init__(self, type: str, req: int = 0, fields: dict | None = None, payloads: list | None = None):
        self.type = type
        self.req = req
        self.fields = fields if fields is not None else {}
        self.payloads = payloads if payloads is not None else []

    def __getitem__(self, key: str):
        return self.fields[key]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"Message({self.type!r}, req={self.req}, fields={self.fields!r}, payloads={[len(memoryview(p)) for p in self.payloads]})"


def encode(msg_type: str, req: int = 0, payloads: tuple | list = (), **fields) -> list:
    """Frames for one message: ``[header, *payloads]``. Payloads go out as given (bytes, memoryview, buffers)."""
    if msg_type not in SCHEMAS:
        raise ValueError(f"unknown message type {msg_type!r}")
    header = {"v": VERSION, "type": msg_type, "req": req}
    header.update(fields)
    return [msgpack.packb(header, use_bin_type=True)] + list(payloads)


def encode_error(error: ProtocolError, req: int | None = None) -> list:
    """An ERROR message (§7) for ``error``, answering request ``req`` (default: the error's own)."""
    return encode(
        "ERROR",
        error.req if req is None else req,
        code=error.code,
        message=error.message,
        retryable=bool(error.retryable),
        **error.extra,
    )


def _buffer(frame) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryviews are buffers already.
    return memoryview(getattr(frame, "buffer", frame))


_BOUNDS = dict(
    max_str_len=_MAX_STR, max_bin_len=_MAX_STR, max_array_len=_MAX_ARRAY, max_map_len=_MAX_MAP, max_ext_len=0
)


def read_req(raw) -> int:
    """The header's ``req`` wherever the bytes let it be read, else 0 (§7.1).

    Readable means: the first ``MAX_HEADER_BYTES`` of ``raw`` start a msgpack map (within the §6.1 bounds)
    whose ``req`` entry, reached before any malformed byte, is an integer 0 <= req < 2**64. Other entries
    are skipped without being built, so this costs nothing on hostile bytes.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HEADER_BYTES, **_BOUNDS)
    unpacker.feed(_buffer(raw)[:MAX_HEADER_BYTES])
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "req":
                req = unpacker.unpack()
                return req if _CHECKS["uint"](req) else 0
            unpacker.skip()
    except Exception:  # truncated, malformed or out of bounds before `req`: unreadable
        pass
    return 0


def sent_by(msg_type: str, side: str) -> bool:
    """Whether ``side`` ("client" or "server") sends messages of ``msg_type`` (§9)."""
    return SCHEMAS[msg_type][0] in (side, "both")


def decode(frames: list, sender: str | None = None) -> Message:
    """Parse and validate one message (without the ROUTER identity). Raises ProtocolError (§7).

    Checks run in the order of §7.1 and the first failure is the error; it carries the header's ``req``
    whenever that can be read (``read_req``). ``sender`` ("client" or "server"): the side the message comes
    from; a type that side does not send is ``unknown-type``.
    """
    if not frames:
        raise ProtocolError(
            "bad-message", "empty message: expected a msgpack header frame (PROTOCOL.md §3.1)"
        )
    raw = _buffer(frames[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(
            "too-large",
            f"header of {raw.nbytes} bytes exceeds the {MAX_HEADER_BYTES}-byte limit (§6.1)",
            req=read_req(raw),
        )
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, **_BOUNDS)
    except ValueError as err:  # msgpack's limit, format, extra-data and UTF-8 errors are all ValueErrors
        raise ProtocolError(
            "bad-message", f"header is not valid msgpack within limits: {err}", req=read_req(raw)
        ) from None
    except Exception as err:  # any other decoder failure on hostile bytes gets the same answer
        raise ProtocolError(
            "bad-message", f"header is not valid msgpack: {type(err).__name__}", req=read_req(raw)
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError("bad-message", "header must be a msgpack map (§3.1)")
    req = header.get("req")
    if not _CHECKS["uint"](req):
        raise ProtocolError("bad-message", "header needs 'req', an integer >= 0 (§3.2)")
    version = header.get("v")
    if not _CHECKS["int"](version):
        raise ProtocolError("bad-message", "header needs 'v', the protocol version (§3.2)", req=req)
    msg_type = header.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError("bad-message", "header needs 'type', a string (§3.2)", req=req)
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported-version",
            f"protocol version {version} is not spoken here; supported: {list(SUPPORTED_VERSIONS)}",
            req=req,
            supported=list(SUPPORTED_VERSIONS),
        )
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError("unknown-type", f"unknown message type {msg_type[:64]!r} (§4)", req=req)
    _, required, optional, n_payloads = schema
    if sender is not None and not sent_by(msg_type, sender):
        raise ProtocolError("unknown-type", f"{msg_type} is not sent by a {sender} (§9)", req=req)
    payloads = list(frames[1:])
    if len(payloads) != n_payloads:
        raise ProtocolError(
            "bad-message",
            f"{msg_type} carries {len(payloads)} payload frame(s), expected {n_payloads} (§4)",
            req=req,
        )
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "req")}
    for name, kind in list(required.items()) + list(optional.items()):
        if name not in fields:
            if name in required:
                raise ProtocolError("bad-message", f"{msg_type} needs field {name!r} ({kind})", req=req)
            continue
        value = fields[name]
        if value is None and kind.endswith("?"):
            continue
        if not _CHECKS[kind.rstrip("?")](value):
            got = "nil" if value is None else type(value).__name__
            raise ProtocolError("bad-message", f"{msg_type}.{name} must be {kind}, got {got}", req=req)
    return Message(msg_type, req, fields, payloads)


def to_rational(value) -> list:
    """A Fraction (or int) as the wire's ``[numerator, denominator]`` (§3.3)."""
    value = Fraction(value)
    return [value.numerator, value.denominator]


def from_rational(value) -> Fraction:
    """The wire's ``[numerator, denominator]`` as a Fraction; ValueError if it is not one."""
    if not _CHECKS["rational"](value):
        raise ValueError(f"not a rational [numerator, denominator>0]: {value!r}")
    return Fraction(value[0], value[1])

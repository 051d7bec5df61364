"""The RTP/1 codec against PROTOCOL.md (sections cited per test); no server needed."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import msgpack
import pytest
import retalk_protocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from retalk_protocol import codec
from retalk_protocol.codec import ProtocolError

PROTOCOL_DIR = Path(retalk_protocol.__file__).resolve().parent

# One valid example of every message type (§4), built from the spec's tables.
EXAMPLES = {
    "HELLO": ({"versions": [1], "client": "test"}, 0),
    "WELCOME": ({"version": 1, "server": "retalk"}, 0),
    "UPLOAD": ({"name": "a.wav", "size": 10, "sha256": "0" * 64}, 0),
    "UPLOAD_READY": ({"upload": "u", "chunk": 1024, "credit": 4}, 0),
    "UPLOAD_CHUNK": ({"upload": "u", "offset": 0}, 1),
    "UPLOAD_ACK": ({"upload": "u", "received": 5}, 0),
    "UPLOADED": ({"upload": "u", "size": 10}, 0),
    "SUBMIT": ({"clip": {"path": "a.mp4"}, "audio": {"upload": "u"}, "rate": [1350, 61], "end": None}, 0),
    "ACCEPTED": ({"job": "j", "position": 0}, 0),
    "PROGRESS": ({"job": "j", "state": "running", "eta": None}, 0),
    "WATCH": ({"job": "j"}, 0),
    "STATUS": ({}, 0),
    "STATUS_REPLY": ({"queue": []}, 0),
    "LIST": ({"states": ["done"], "limit": 5}, 0),
    "JOBS": ({"jobs": []}, 0),
    "CANCEL": ({"job": "j"}, 0),
    "CANCELLED": ({"job": "j", "state": "cancelled"}, 0),
    "RENDER": ({"job": "j", "first": 0, "last": 3, "format": "rgb16", "credit": 4}, 0),
    "FETCH": ({"job": "j", "credit": 2}, 0),
    "STREAM": ({"stream": "s", "job": "j", "credit": 4}, 0),
    "AUDIO": ({"stream": "s", "rate": 48000, "sample": 0}, 1),
    "FRAME": ({"stream": "s", "index": 3, "time": [3, 25], "width": 2, "height": 1}, 1),
    "CHUNK": ({"stream": "s", "offset": 0}, 1),
    "END": ({"stream": "s", "count": 3}, 0),
    "CREDIT": ({"stream": "s", "credit": 2}, 0),
    "ABORT": ({"stream": "s"}, 0),
    "HEARTBEAT": ({}, 0),
    "BYE": ({}, 0),
    "ERROR": ({"code": "busy", "message": "later", "retryable": True}, 0),
}


def _header(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_every_message_type_of_section_4_has_an_example():
    assert set(EXAMPLES) == set(codec.SCHEMAS)


@pytest.mark.parametrize("msg_type", sorted(EXAMPLES))
def test_section_3_round_trip_of_each_message(msg_type):
    fields, n_payloads = EXAMPLES[msg_type]
    payloads = [bytes(range(7))] * n_payloads
    frames = codec.encode(msg_type, 42, payloads, **fields)
    assert len(frames) == 1 + n_payloads
    message = codec.decode(frames)
    assert (message.type, message.req, message.fields) == (msg_type, 42, fields)
    assert [bytes(p) for p in message.payloads] == payloads


@pytest.mark.parametrize("msg_type", sorted(EXAMPLES))
def test_section_3_3_missing_required_field_is_bad_message(msg_type):
    required = codec.SCHEMAS[msg_type][0]
    fields, n_payloads = EXAMPLES[msg_type]
    for name in required:
        partial = {k: v for k, v in fields.items() if k != name}
        with pytest.raises(ProtocolError) as err:
            codec.decode(codec.encode(msg_type, 1, [b"x"] * n_payloads, **partial))
        assert err.value.code == "bad-message" and name in str(err.value) and err.value.req == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"job": 5},  # str expected
        {"job": "j", "first": -1},  # uint
        {"job": "j", "first": True},  # a bool is not an int
        {"job": "j", "credit": 1.5},
        {"job": "j", "audio": 1},
    ],
)
def test_section_3_3_wrong_field_types_are_bad_message(fields):
    with pytest.raises(ProtocolError) as err:
        codec.decode(codec.encode("RENDER", 3, **fields))
    assert err.value.code == "bad-message"


@pytest.mark.parametrize("rate", [[1, 0], [1, -25], [25], [1.5, 2], "25", [2**63, 1]])
def test_section_3_2_rationals_need_a_positive_denominator_and_ints(rate):
    with pytest.raises(ProtocolError):
        codec.decode(codec.encode("SUBMIT", 1, clip={"path": "a"}, audio={"path": "b"}, rate=rate))


def test_section_3_2_rationals_stay_exact():
    rate = Fraction(1350, 61)
    assert codec.from_rational(codec.to_rational(rate)) == rate
    message = codec.decode(
        codec.encode(
            "FRAME", 0, [b""], stream="s", index=7, time=codec.to_rational(7 / rate), width=0, height=0
        )
    )
    assert codec.from_rational(message["time"]) == Fraction(7 * 61, 1350)


def test_section_3_1_payload_count_is_checked():
    with pytest.raises(ProtocolError) as err:
        codec.decode(codec.encode("FRAME", 0, [], stream="s", index=0, time=[0, 1], width=1, height=1))
    assert err.value.code == "bad-message"
    with pytest.raises(ProtocolError):
        codec.decode(codec.encode("STATUS", 0, [b"extra"]))


def test_section_3_2_unknown_keys_are_ignored():
    message = codec.decode([_header(v=1, type="WATCH", req=2, job="j", future_key=[1, 2])])
    assert message["job"] == "j" and message["future_key"] == [1, 2]


@pytest.mark.parametrize(
    "header, code",
    [
        (b"\xc1", "bad-message"),  # never-used msgpack byte
        (msgpack.packb([1, 2, 3]), "bad-message"),  # not a map
        (_header(v=1, type="STATUS"), "bad-message"),  # no req
        (_header(v=1, req=1), "bad-message"),  # no type
        (_header(type="STATUS", req=1), "bad-message"),  # no v
        (_header(v=2, type="STATUS", req=1), "unsupported-version"),
        (_header(v=1, type="TELEPORT", req=1), "unknown-type"),
        (_header(v=1, type="STATUS", req=-1), "bad-message"),
        (msgpack.packb({1: 2}), "bad-message"),  # non-string keys
    ],
)
def test_section_7_error_codes_for_bad_headers(header, code):
    with pytest.raises(ProtocolError) as err:
        codec.decode([header])
    assert err.value.code == code
    assert err.value.retryable is codec.ERROR_CODES[code]
    assert "\n" not in str(err.value)


def test_section_6_1_oversized_header_is_refused_before_decoding():
    huge = _header(v=1, type="STATUS", req=1, pad="x" * (codec.MAX_HEADER_BYTES + 1))
    with pytest.raises(ProtocolError) as err:
        codec.decode([huge])
    assert err.value.code == "too-large"


def test_section_6_1_huge_declared_lengths_are_refused_without_allocating():
    # A map header claiming 2**32-1 entries, a str claiming 4 GiB, an array claiming 4 G items: tiny frames.
    for raw in (b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff" + b"x" * 10, b"\xdd\xff\xff\xff\xff\x01"):
        with pytest.raises(ProtocolError) as err:
            codec.decode([raw])
        assert err.value.code == "bad-message"


def test_section_7_error_message_round_trip():
    error = ProtocolError("unsupported-version", "no common version", req=9, supported=[1])
    message = codec.decode(codec.encode_error(error))
    assert message.type == "ERROR" and message.req == 9
    assert (message["code"], message["retryable"], message["supported"]) == (
        "unsupported-version",
        False,
        [1],
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_section_7_fuzz_random_frames_only_raise_protocol_errors(frames):
    try:
        message = codec.decode(frames)
    except ProtocolError as err:
        assert err.code in codec.ERROR_CODES
    else:
        assert message.type in codec.SCHEMAS


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(codec.SCHEMAS) + ["NOPE"]),
    st.dictionaries(st.sampled_from(["job", "stream", "first", "rate", "clip", "credit", "x"]), _values),
    st.integers(min_value=-2, max_value=3),
    st.integers(min_value=0, max_value=2),
    st.integers(min_value=1, max_value=40),
)
def test_section_7_fuzz_wrong_types_and_truncation_only_raise_protocol_errors(
    msg_type, fields, version, n_payloads, cut
):
    header = msgpack.packb({"v": version, "type": msg_type, "req": 1, **fields}, use_bin_type=True)
    for frames in ([header] + [b"p"] * n_payloads, [header[:cut]]):
        try:
            codec.decode(frames)
        except ProtocolError as err:
            assert err.code in codec.ERROR_CODES


@pytest.mark.parametrize("name", ["codec.py", "client.py", "__init__.py"])
def test_protocol_package_is_python_3_8_syntax(name):
    # Resolve's and Blender's Pythons import this package: it must parse with the 3.8 grammar.
    source = (PROTOCOL_DIR / name).read_text()
    ast.parse(source, filename=name, feature_version=(3, 8))
    assert "from __future__ import annotations" in source or name == "__init__.py"


def test_protocol_package_imports_only_pyzmq_and_msgpack():
    allowed = {"zmq", "msgpack", "collections", "hashlib", "os", "time", "fractions", "__future__", "numpy"}
    for name in ("codec.py", "client.py"):
        tree = ast.parse((PROTOCOL_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


def test_spec_documents_every_message_and_error_code():
    spec = (PROTOCOL_DIR / "PROTOCOL.md").read_text()
    for msg_type in codec.SCHEMAS:
        assert f"`{msg_type}`" in spec, msg_type
    for code in codec.ERROR_CODES:
        if code != "timeout":
            assert f"`{code}`" in spec, code

"""The RTP/1 codec and the job options table against PROTOCOL.md (sections cited per test); no server needed."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
from fractions import Fraction
from pathlib import Path

import msgpack
import pytest
import retalk_protocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from retalk_protocol import codec
from retalk_protocol import options as job_options
from retalk_protocol.codec import ProtocolError
from server_support import EXAMPLES, mutations

from retalk import media
from retalk.commands import redub as redub_command
from retalk.commands import server as server_command
from retalk.pipeline import timing
from retalk.pipeline.request import RedubRequest

PROTOCOL_DIR = Path(retalk_protocol.__file__).resolve().parent
SPEC = (PROTOCOL_DIR / "PROTOCOL.md").read_text()
MODULES = ("codec.py", "client.py", "options.py", "__init__.py")


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
def test_section_3_4_missing_required_field_is_bad_message(msg_type):
    required = codec.SCHEMAS[msg_type][1]
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
def test_section_3_4_wrong_field_types_are_bad_message(fields):
    with pytest.raises(ProtocolError) as err:
        codec.decode(codec.encode("RENDER", 3, **fields))
    assert err.value.code == "bad-message"


@pytest.mark.parametrize("rate", [[1, 0], [1, -25], [25], [1.5, 2], "25", [2**63, 1]])
def test_section_3_3_rationals_need_a_positive_denominator_and_ints(rate):
    with pytest.raises(ProtocolError):
        codec.decode(codec.encode("SUBMIT", 1, clip={"path": "a"}, audio={"path": "b"}, rate=rate))


def test_section_3_3_rationals_stay_exact():
    rate = Fraction(1350, 61)
    assert codec.from_rational(codec.to_rational(rate)) == rate
    fields = dict(EXAMPLES["FRAME"][0], index=7, time=codec.to_rational(7 / rate))
    message = codec.decode(codec.encode("FRAME", 0, [b""], **fields))
    assert codec.from_rational(message["time"]) == Fraction(7 * 61, 1350)


def test_section_3_1_payload_count_is_checked():
    with pytest.raises(ProtocolError) as err:
        codec.decode(codec.encode("FRAME", 0, [], **EXAMPLES["FRAME"][0]))
    assert err.value.code == "bad-message"
    with pytest.raises(ProtocolError):
        codec.decode(codec.encode("STATUS", 0, [b"extra"]))


def test_section_3_3_unknown_keys_are_ignored():
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


@pytest.mark.parametrize("name", MODULES)
def test_protocol_package_is_python_3_8_syntax(name):
    # Resolve's and Blender's Pythons import this package: it must parse with the 3.8 grammar.
    source = (PROTOCOL_DIR / name).read_text()
    ast.parse(source, filename=name, feature_version=(3, 8))
    assert "from __future__ import annotations" in source or name == "__init__.py"


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("codec.py", {"msgpack", "fractions", "__future__"}),
        ("client.py", {"zmq", "collections", "hashlib", "os", "time", "fractions", "__future__", "numpy"}),
        ("options.py", {"__future__"}),  # the table: no third-party import, no torch
    ],
)
def test_protocol_package_imports_only_pyzmq_and_msgpack(name, allowed):
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
    for msg_type in codec.SCHEMAS:
        assert f"`{msg_type}`" in SPEC, msg_type
    for code in codec.ERROR_CODES:
        if code != "timeout":
            assert f"`{code}`" in SPEC, code


# -- §7.1: every error carries the request's req whenever it can be read -----------------------------------
@pytest.mark.parametrize("msg_type", sorted(EXAMPLES))
def test_section_7_1_every_error_carries_a_readable_req(msg_type):
    for what, frames in mutations(msg_type, 4242):
        with pytest.raises(ProtocolError) as err:
            codec.decode(frames)
        assert err.value.req == 4242, (what, err.value.code, err.value.message)


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "empty"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb({"v": 1, "type": "STATUS"}), "no req"),
        (msgpack.packb({"v": 1, "type": "STATUS", "req": -1}), "negative"),
        (msgpack.packb({"v": 1, "type": "STATUS", "req": "5"}), "a string"),
        (msgpack.packb({"v": 1, "type": "STATUS", "req": True}), "a bool"),
        (msgpack.packb({"v": 1, "type": "STATUS", "req": 5})[:-1], "cut inside req"),
        (b"\x83\xc1" + msgpack.packb({"req": 5})[1:], "malformed before req"),
        (b"\xdf\xff\xff\xff\xff", "a map beyond the bounds"),
    ],
)
def test_section_7_1_an_unreadable_req_is_0(raw, why):
    assert codec.read_req(raw) == 0, why
    with pytest.raises(ProtocolError) as err:
        codec.decode([raw])
    assert err.value.req == 0 and err.value.code == "bad-message", why


def test_section_7_1_req_is_read_within_the_first_header_bytes_only():
    late = msgpack.packb({**{f"pad{k}": "x" * 16000 for k in range(5)}, "req": 9})
    assert len(late) > codec.MAX_HEADER_BYTES and codec.read_req(late) == 0
    assert codec.read_req(msgpack.packb({"req": 9, "pad": "x" * 70000})) == 9


def test_section_7_1_the_first_failing_check_decides():
    # version before type, type before fields, a server-only type from a client before its fields
    unknown_v2 = msgpack.packb({"v": 2, "type": "NOPE", "req": 3})
    assert _code([unknown_v2]) == "unsupported-version"
    assert _code([msgpack.packb({"v": 1, "type": "NOPE", "req": 3, "job": 5})]) == "unknown-type"
    assert _code([msgpack.packb({"v": 1, "type": "WELCOME", "req": 3})], sender="client") == "unknown-type"
    assert _code([msgpack.packb({"v": 1, "type": "WELCOME", "req": 3})]) == "bad-message"
    assert _code([msgpack.packb({"v": 1, "type": "WATCH", "req": 3, "job": 5}), b"x"]) == "bad-message"


def _code(frames, sender=None) -> str:
    with pytest.raises(ProtocolError) as err:
        codec.decode(frames, sender=sender)
    assert err.value.req == 3
    return err.value.code


@pytest.mark.parametrize("msg_type", sorted(EXAMPLES))
def test_section_9_a_message_from_the_wrong_side_is_unknown_type(msg_type):
    fields, n_payloads = EXAMPLES[msg_type]
    frames = codec.encode(msg_type, 8, [b"p"] * n_payloads, **fields)
    for side in ("client", "server"):
        if codec.sent_by(msg_type, side):
            assert codec.decode(frames, sender=side).type == msg_type
        else:
            with pytest.raises(ProtocolError) as err:
                codec.decode(frames, sender=side)
            assert (err.value.code, err.value.req) == ("unknown-type", 8)


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading`` in PROTOCOL.md, as lists of cells."""
    text = SPEC[SPEC.index(heading) :]
    lines = text[text.index("\n|") + 1 :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def _fields(cell: str) -> dict:
    return dict(re.findall(r"`(\w+)` (\w+\??)", cell))


def test_section_9_summary_says_what_the_codec_checks():
    rows = _table("## 9. Message summary")
    documented = {row[0].strip("`"): (row[1], _fields(row[2]), _fields(row[3]), int(row[4])) for row in rows}
    assert documented == codec.SCHEMAS


# -- §4.3.1: the job options table ---------------------------------------------------------------------------
def test_section_4_3_1_the_spec_s_option_table_is_the_code_s():
    documented = {}
    for name, type_name, default, choices, engines, meaning in _table("#### 4.3.1. Job options"):
        documented[name.strip("`")] = {
            "type": type_name,
            "default": json.loads(default.strip("`")),
            "choices": re.findall(r"`([^`]+)`", choices),
            "path": "path" in choices,
            "engines": [engine.strip() for engine in engines.split(",")],
            "help": meaning,
        }
    assert documented == {
        name: {key: value for key, value in option.describe().items() if key != "name"}
        for name, option in job_options.JOB_OPTIONS.items()
    }


def test_section_4_3_1_every_option_is_a_redub_request_field_with_the_table_s_default():
    fields = {field.name: field.default for field in dataclasses.fields(RedubRequest)}
    for name, option in {"engine": job_options.ENGINE, **job_options.JOB_OPTIONS}.items():
        assert fields[name] == option.default, name
    # and every field a job chooses is in the table (the rest say where the inputs are and where it runs)
    where = {"video", "audio", "output", "start", "end", "audio_offset", "checkpoints", "device", "precision"}
    assert set(fields) - where - {"cache_dir"} == {"engine", *job_options.JOB_OPTIONS}


def test_section_4_3_1_choices_are_what_the_pipeline_implements():
    assert set(job_options.JOB_OPTIONS["codec"].choices) == set(media.CODECS)
    assert job_options.JOB_OPTIONS["fit"].choices == timing.FIT_MODES
    assert job_options.JOB_OPTIONS["extend"].choices == timing.EXTEND_MODES


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("seed", True, "expected int, got bool"),  # a bool is not an int
        ("use_cache", 1, "expected bool, got int"),  # nor an int a bool
        ("seed", "7", "expected int, got str"),
        ("fit", "sideways", "expected one of video, audio"),
        ("detector", "s3fd", "expected one of auto, reference, dlib"),
        ("expression", "/media/smile.png", None),  # a path option: a file, confined by the server
        ("face", "320,180", None),
        ("codec", "lossless", None),
    ],
)
def test_section_4_3_1_values_are_checked_by_type_and_choice(name, value, problem):
    assert job_options.JOB_OPTIONS[name].problem(value) == problem


def test_section_4_3_1_unknown_options_are_refused_and_absent_ones_take_their_defaults():
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        job_options.complete({"colour": "red"})
    assert job_options.complete({"seed": 3}) == dict(job_options.defaults(), seed=3)


@pytest.mark.parametrize("command", ["redub", "submit"])
def test_the_cli_parsers_are_built_from_the_table(command):
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    (redub_command if command == "redub" else server_command).register(subparsers)
    base = ["--video", "v.mp4", "--audio", "a.wav"] + (["-o", "o.mp4"] if command == "redub" else [])
    args = parser.parse_args([command, *base])
    assert job_options.from_arguments(args) == job_options.defaults()
    assert args.engine == job_options.ENGINE.default
    flags = ["--upper-face", "sad", "--detector", "dlib", "--seed", "4", "--no-cache"]
    flags += ["--expression", "x.png"]
    changed = job_options.from_arguments(parser.parse_args([command, *base, *flags]))
    assert changed == dict(
        job_options.defaults(), upper_face="sad", detector="dlib", seed=4, use_cache=False, expression="x.png"
    )
    with pytest.raises(SystemExit):  # closed choices are argparse's to refuse
        parser.parse_args([command, *base, "--detector", "s3fd"])

"""A real `retalk serve` process on 127.0.0.1 with two workers running the real preview pipeline, tested message
by message against PROTOCOL.md (sections cited), under load (8 clients x 25 jobs) and under hostile input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
from fractions import Fraction

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from retalk_protocol import codec
from retalk_protocol import options as job_options
from retalk_protocol.client import Client, audio_array, frame_array
from retalk_protocol.codec import ProtocolError
from server_support import CLIP_FRAMES, EXAMPLES, ServerProcess, make_media, mutations, wait_for

from retalk import media
from retalk.cli import main as retalk_main

LOSSLESS = {"codec": "lossless"}


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_media(root)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.wav").write_bytes((root / "tone.wav").read_bytes())
    os.symlink(outside / "secret.wav", root / "escape.wav")
    os.symlink(outside, root / "escape_dir")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root):
    process = ServerProcess(tmp_path_factory.mktemp("state") / "state", media_root, "--workers", "2")
    yield process
    process.stop()


@pytest.fixture
def client(server):
    with Client(server.endpoint, name="pytest", timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def done_job(server, media_root):
    """One finished lossless job (submitted with the clip's exact rate, §4.3)."""
    with Client(server.endpoint, name="pytest", timeout=120) as session:
        job = session.submit(
            str(media_root / "clip.mp4"), "tone.wav", rate=Fraction(25), engine="preview", options=LOSSLESS
        )
        events = []
        final = session.follow(job, timeout=300, on_progress=events.append)
    assert final["state"] == "done", final
    return job, final, events


class Raw:
    """A bare DEALER for messages the client class would never send."""

    def __init__(self, endpoint: str, hello: bool = True, name: str = "raw"):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        if hello:
            self.send(codec.encode("HELLO", 1, versions=[1], client=name))
            assert self.recv().type == "WELCOME"

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout: float = 30.0, skip=("HEARTBEAT",)) -> codec.Message:
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            message = codec.decode(self.socket.recv_multipart())
            if message.type not in skip and not (message.type == "PROGRESS" and message.req == 0):
                return message
        raise AssertionError("no reply")

    def close(self) -> None:
        self.socket.close()


def _error_code(call) -> str:
    with pytest.raises(ProtocolError) as err:
        call()
    assert "\n" not in err.value.message
    return err.value.code


# -- §4.1 ----------------------------------------------------------------------------------------------------
def test_s4_1_hello_gets_welcome_with_capabilities(client):
    welcome = client.welcome
    assert welcome["version"] == 1
    assert set(welcome["formats"]) == {"rgb8", "rgb16", "rgba-half"}
    assert "preview" in welcome["engines"] and "lossless" in welcome["codecs"]
    assert welcome["limits"]["credit"] >= 1 and welcome["heartbeat"] > 0 and welcome["timeout"] > 0


def test_s4_1_no_common_version_is_unsupported_version(server):
    raw = Raw(server.endpoint, hello=False)
    raw.send(codec.encode("HELLO", 5, versions=[7, 8]))
    reply = raw.recv()
    raw.close()
    assert (reply.type, reply["code"], reply.req, reply["supported"]) == (
        "ERROR",
        "unsupported-version",
        5,
        [1],
    )


def test_s4_1_request_before_hello_is_hello_required(server):
    raw = Raw(server.endpoint, hello=False)
    raw.send(codec.encode("STATUS", 3))
    reply = raw.recv()
    raw.close()
    assert (reply.type, reply["code"], reply.req) == ("ERROR", "hello-required", 3)


def test_s4_1_welcome_offers_the_job_options_table(client):
    assert client.welcome["options"] == [option.describe() for option in job_options.JOB_OPTIONS.values()]


def test_s4_1_a_failed_hello_leaves_the_session_as_it_was(server):
    raw = Raw(server.endpoint, hello=False)
    raw.send(codec.encode("HELLO", 5, versions=[7]))
    assert raw.recv()["code"] == "unsupported-version"
    raw.send(codec.encode("STATUS", 6))
    assert raw.recv()["code"] == "hello-required"  # still no session
    raw.send(codec.encode("HELLO", 7, versions=[1], client="second try"))
    assert raw.recv().type == "WELCOME"
    raw.send(codec.encode("HELLO", 8, versions=[9]))
    assert raw.recv()["code"] == "unsupported-version"
    raw.send(codec.encode("STATUS", 9))
    reply = raw.recv()
    raw.close()
    assert (reply.type, reply.req) == ("STATUS_REPLY", 9)  # the greeted session goes on


def test_s4_client_sending_a_server_message_is_unknown_type(server):
    raw = Raw(server.endpoint)
    raw.send(codec.encode("WELCOME", 4, version=1, server="me"))
    reply = raw.recv()
    raw.close()
    assert (reply["code"], reply.req) == ("unknown-type", 4)


# -- §4.3, §4.4 ----------------------------------------------------------------------------------------------
def test_s4_3_s4_4_submit_is_accepted_and_progress_ends_done(done_job):
    job, final, events = done_job
    states = [e["state"] for e in events]
    assert states[-1] == "done" and "running" in states
    stages = {e["stage"] for e in events if e["stage"]}
    assert {"track", "render", "encode"} <= stages
    result = final["result"]
    assert result["frames"] == CLIP_FRAMES and codec.from_rational(result["rate"]) == 25
    assert codec.from_rational(result["duration"]) == Fraction(CLIP_FRAMES, 25)
    assert result["engine"] == "preview" and result["codec"] == "lossless"


def test_s4_3_rate_mismatch_is_invalid(client, media_root):
    code = _error_code(
        lambda: client.submit("clip.mp4", "tone.wav", rate=Fraction(1350, 61), engine="preview")
    )
    assert code == "invalid"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"options": {"colour": "red"}},  # unknown option
        {"options": {"seed": "7"}},  # wrong type
        {"options": {"fit": "sideways"}},  # pipeline's own validation
        {"start": 2, "end": CLIP_FRAMES + 5},  # outside the clip
        {"engine": "warp"},
    ],
)
def test_s4_3_bad_options_are_invalid(client, kwargs):
    assert _error_code(lambda: client.submit("clip.mp4", "tone.wav", **kwargs)) == "invalid"


@pytest.mark.parametrize(
    "clip, code",
    [
        ("../outside/secret.wav", "forbidden"),  # traversal
        ("sub/../../etc/passwd", "forbidden"),
        ("/etc/passwd", "forbidden"),  # absolute, outside the roots
        ("escape.wav", "forbidden"),  # a symlink inside the root pointing outside
        ("escape_dir/secret.wav", "forbidden"),  # through a symlinked folder
        ("missing.mp4", "not-found"),
        ("bad\x00name", "forbidden"),
    ],
)
def test_s6_2_paths_are_confined_to_the_media_roots(client, clip, code):
    assert _error_code(lambda: client.submit(clip, "tone.wav", engine="preview")) == code


def test_s6_2_audio_path_is_confined_too(client):
    assert _error_code(lambda: client.submit("clip.mp4", "escape.wav", engine="preview")) == "forbidden"


# -- §4.2 ----------------------------------------------------------------------------------------------------
def test_s4_2_uploaded_media_run_a_job(client, media_root):
    clip = client.upload(str(media_root / "clip.mp4"))
    audio = client.upload(str(media_root / "tone.wav"))
    job = client.submit({"upload": clip}, {"upload": audio}, engine="preview", options=LOSSLESS)
    final = client.follow(job, timeout=300)
    assert final["state"] == "done" and final["result"]["frames"] == CLIP_FRAMES
    # an upload is consumed by the job that used it
    assert _error_code(lambda: client.submit({"upload": clip}, "tone.wav")) == "not-found"


def test_s4_2_upload_checksum_mismatch_and_size_limit(client, media_root):
    data = (media_root / "tone.wav").read_bytes()
    ready = client.request("UPLOAD", name="t.wav", size=len(data), sha256="0" * 64)
    client._send(codec.encode("UPLOAD_CHUNK", 7, [data], upload=ready["upload"], offset=0))
    replies = []
    while not replies or replies[-1].type not in ("ERROR", "UPLOADED"):
        replies.append(client._receive(time.monotonic() + 30))
    assert replies[-1].type == "ERROR" and replies[-1]["code"] == "checksum" and replies[-1]["retryable"]
    too_big = client.welcome["limits"]["upload"] + 1
    assert (
        _error_code(lambda: client.request("UPLOAD", name="x", size=too_big, sha256="0" * 64)) == "too-large"
    )


def test_s4_2_refused_chunks_carry_their_req_and_change_nothing(server, media_root):
    data = (media_root / "tone.wav").read_bytes()[:3000]
    raw = Raw(server.endpoint)
    raw.send(
        codec.encode("UPLOAD", 10, name="t.wav", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    )
    ready = raw.recv()
    assert (ready.type, ready.req) == ("UPLOAD_READY", 10)
    upload, limit = ready["upload"], ready["chunk"]
    refused = [
        (11, upload, 5, data[:10], "invalid"),  # out of order
        (12, upload, 0, data + b"x", "too-large"),  # past the declared size
        (13, upload, 0, b"x" * (limit + 1), "too-large"),  # above the chunk limit
        (14, "nope", 0, data, "not-found"),
    ]
    for req, upload_id, offset, chunk, code in refused:
        raw.send(codec.encode("UPLOAD_CHUNK", req, [chunk], upload=upload_id, offset=offset))
        reply = raw.recv()
        assert (reply.type, reply["code"], reply.req) == ("ERROR", code, req)
    raw.send(codec.encode("UPLOAD_CHUNK", 15, [data], upload=upload, offset=0))
    ack, done = raw.recv(), raw.recv()
    raw.close()
    assert (ack.type, ack.req, ack["received"]) == ("UPLOAD_ACK", 15, len(data))
    assert (done.type, done.req, done["size"]) == ("UPLOADED", 15, len(data))


def test_s4_9_bye_drops_the_session_s_unused_uploads(server, media_root):
    folder = server.state_dir / "uploads"
    with Client(server.endpoint, name="pytest") as session:
        upload = session.upload(str(media_root / "tone.wav"))
        assert (folder / f"{upload}.wav").is_file()
    wait_for(lambda: not (folder / f"{upload}.wav").exists(), 10, "the upload to be deleted after BYE")


def test_s6_2_submit_or_upload_uploads_only_what_the_server_cannot_read(client, tmp_path):
    clip, audio = make_media(tmp_path / "elsewhere")
    with pytest.raises(ProtocolError) as err:
        client.submit_or_upload(str(clip), str(audio), upload="never", engine="preview")
    assert err.value.code == "forbidden"
    uploads = []
    job = client.submit_or_upload(
        str(clip), str(audio), on_upload=lambda: uploads.append(1), engine="preview", options=LOSSLESS
    )
    assert len(uploads) == 1 and client.follow(job, timeout=300)["state"] == "done"
    inside = client.submit_or_upload("clip.mp4", "tone.wav", on_upload=lambda: uploads.append(0))
    assert len(uploads) == 1 and client.cancel(inside) in ("cancelled", "running")


# -- §4.5 ----------------------------------------------------------------------------------------------------
def test_s4_5_status_list_watch(client, done_job):
    job, _, _ = done_job
    status = client.status()
    assert len(status["workers"]) == 2 and status["devices"] == ["cpu"]
    assert status["jobs"].get("done", 0) >= 1 and status["clients"] >= 1
    listed = {entry["job"]: entry for entry in client.list_jobs(states=["done"])}
    assert listed[job]["state"] == "done" and listed[job]["client"].startswith("pytest@")
    watched = client.watch(job)
    assert watched.type == "PROGRESS" and watched["state"] == "done" and watched.req > 0


def test_s4_5_list_one_job_with_its_age_and_progress_and_say_when_more_are_left(client, done_job):
    job, final, _ = done_job
    (entry,) = client.list_jobs(job=job)
    assert (entry["job"], entry["state"], entry["attempt"]) == (job, "done", final["attempt"])
    assert entry["age"] >= 0 and entry["client"].startswith("pytest@")
    assert (entry["stage"], entry["done"], entry["total"]) == ("", 0, 0)
    assert client.list_jobs(job="nope") == []
    reply = client.request("LIST", limit=1)
    assert len(reply["jobs"]) == 1 and reply["more"] is True


def test_s4_5_unknown_and_finished_jobs(client, done_job):
    assert _error_code(lambda: client.watch("nope")) == "not-found"
    assert _error_code(lambda: client.cancel("nope")) == "not-found"
    assert _error_code(lambda: client.cancel(done_job[0])) == "invalid"


# -- §4.6, §4.7, §4.8, §5 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fetched(server, done_job, tmp_path_factory):
    path = tmp_path_factory.mktemp("fetch") / "result.mkv"
    with Client(server.endpoint, timeout=60) as session:
        info = session.fetch(done_job[0], str(path))
    return path, info


def test_s4_7_fetch_streams_the_file_with_its_checksum(fetched, done_job):
    path, info = fetched
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == done_job[1]["result"]["sha256"]
    assert info["extension"] == ".mkv" and info["size"] == path.stat().st_size
    assert media.probe(path).frame_count == CLIP_FRAMES


def test_s4_6_render_frames_and_audio_in_each_pixel_format(client, done_job, fetched):
    job = done_job[0]
    expected = media.read_frames(fetched[0], 0, CLIP_FRAMES)
    rendered = {}
    for pixel_format in codec.PIXEL_FORMATS:
        messages = list(client.render(job, format=pixel_format, audio=pixel_format == "rgb8"))
        stream, data = messages[0], messages[1:]
        assert stream.type == "STREAM" and stream["frames"] == CLIP_FRAMES
        frames = [m for m in data if m.type == "FRAME"]
        assert [m["index"] for m in frames] == list(range(CLIP_FRAMES))
        assert [codec.from_rational(m["time"]) for m in frames] == [
            Fraction(i, 25) for i in range(CLIP_FRAMES)
        ]
        rendered[pixel_format] = np.stack([frame_array(m) for m in frames])
        if pixel_format == "rgb8":
            audio = np.concatenate([audio_array(m) for m in data if m.type == "AUDIO"])
            assert len(audio) == CLIP_FRAMES * 48000 // 25
            reference = media.read_audio(fetched[0], sample_rate=48000)[: len(audio)]
            np.testing.assert_allclose(audio, reference, atol=1e-6)
    np.testing.assert_array_equal(rendered["rgb8"], expected)
    np.testing.assert_array_equal(rendered["rgb16"], expected.astype(np.uint16) * 257)
    half = rendered["rgba-half"].astype(np.float32)
    np.testing.assert_allclose(half[..., :3], expected / 255.0, atol=1e-3)
    assert (half[..., 3] == 1).all()


def test_s4_6_render_a_range_and_bad_requests(client, done_job):
    job = done_job[0]
    frames = [m for m in client.render(job, 2, 3, audio=False) if m.type == "FRAME"]
    assert [m["index"] for m in frames] == [2, 3]
    assert _error_code(lambda: next(client.render(job, 0, CLIP_FRAMES))) == "invalid"
    assert _error_code(lambda: next(client.render(job, format="yuv420"))) == "invalid"
    assert _error_code(lambda: next(client.render("nope"))) == "not-found"


def test_s5_server_sends_no_more_than_the_credit(server, done_job):
    raw = Raw(server.endpoint)
    raw.send(codec.encode("RENDER", 2, job=done_job[0], audio=False, credit=2))
    stream = raw.recv()
    assert stream.type == "STREAM" and stream["credit"] == 2
    got = [raw.recv(), raw.recv()]
    assert [m.type for m in got] == ["FRAME", "FRAME"]
    with pytest.raises(AssertionError):
        raw.recv(timeout=1.0)  # credit used up: nothing more comes
    raw.send(codec.encode("CREDIT", 0, stream=stream["stream"], credit=1))
    assert raw.recv()["index"] == 2
    raw.send(codec.encode("ABORT", 9, stream=stream["stream"]))  # §4.8
    end = raw.recv()
    assert (end.type, end.req, end["count"]) == ("END", 9, 3)
    raw.send(codec.encode("CREDIT", 0, stream=stream["stream"], credit=1))
    assert raw.recv()["code"] == "not-found"
    raw.close()


# -- §4.9 ----------------------------------------------------------------------------------------------------
def test_s4_9_server_sends_heartbeats(server):
    raw = Raw(server.endpoint)
    assert raw.recv(timeout=5, skip=()).type == "HEARTBEAT"
    raw.close()


def test_s4_9_a_vanished_client_mid_stream_costs_nothing(server, client, done_job):
    raw = Raw(server.endpoint)
    raw.send(codec.encode("RENDER", 2, job=done_job[0], credit=1))
    assert raw.recv().type == "STREAM"
    assert client.status()["streams"] >= 1
    raw.close()  # gone without BYE, its stream open
    wait_for(lambda: client.status()["streams"] == 0, 30, "the server to drop the vanished client's stream")
    frames = [m for m in client.render(done_job[0], audio=False) if m.type == "FRAME"]
    assert len(frames) == CLIP_FRAMES


# -- §7: hostile input ---------------------------------------------------------------------------------------
_hostile_frames = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),  # random bytes
    st.builds(  # truncated valid headers
        lambda n: [codec.encode("SUBMIT", 1, clip={"path": "clip.mp4"}, audio={"path": "tone.wav"})[0][:n]],
        st.integers(0, 40),
    ),
    st.builds(  # wrong types in a known message
        lambda t, v: [msgpack.packb({"v": 1, "type": t, "req": 1, "job": v, "stream": v, "clip": v})],
        st.sampled_from(["WATCH", "CANCEL", "RENDER", "FETCH", "CREDIT", "SUBMIT"]),
        st.one_of(
            st.integers(-(2**31), 2**31), st.none(), st.lists(st.integers(0, 9), max_size=2), st.floats()
        ),
    ),
    st.builds(  # unknown versions and types
        lambda v, t: [msgpack.packb({"v": v, "type": t, "req": 1})],
        st.integers(-5, 100).filter(lambda v: v != 1),
        st.text(max_size=12),
    ),
    st.just([msgpack.packb({"v": 1, "type": "STATUS", "req": 1, "pad": "x" * 70000})]),  # too large
    st.just([b"\xdd\xff\xff\xff\xff"]),  # huge declared array length
)


@pytest.fixture(scope="module")
def hostile(server):
    raw = Raw(server.endpoint)
    yield raw
    raw.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_hostile_frames)
def test_s7_hostile_messages_get_error_and_the_server_stays_up(hostile, frames):
    hostile.send(frames)
    reply = hostile.recv()
    assert reply.type == "ERROR" and reply["code"] in codec.ERROR_CODES
    hostile.send(codec.encode("STATUS", 77))
    assert hostile.recv().req == 77


_FUZZ_VALUES = [None, True, 0, -1, 2**40, 1.5, "", "x" * 40, "../etc/passwd", [], [1, "a"], {}, b"\x00"]


def test_s7_1_every_due_reply_carries_the_request_s_req(server, capsys):
    """A raw socket sends every message type, valid and spoilt each way (server_support.mutations), then a
    seeded random mix; every reply it is due must carry the request's req, or 0 where none could be read."""
    raw = Raw(server.endpoint, name="fuzz")
    rng = random.Random(14013)
    counts = {"due": 0, "right": 0}
    req = 1000

    def exchange(frames: list, expected: int, what: str) -> None:
        raw.send(frames)
        reply = raw.recv(timeout=30)
        counts["due"] += 1
        counts["right"] += reply.req == expected
        assert reply.req == expected, (what, reply.type, reply.get("code"), reply.get("message"))

    for msg_type in sorted(EXAMPLES):
        for k in range(len(list(mutations(msg_type, 0)))):  # each spoilt message with a req of its own
            what, frames = list(mutations(msg_type, req))[k]
            exchange(frames, req, f"{msg_type}: {what}")
            req += 1
        if msg_type not in ("HEARTBEAT", "BYE"):  # the valid example: its reply or its ERROR, with its req
            fields, n_payloads = EXAMPLES[msg_type]
            exchange(codec.encode(msg_type, req, [b"p"] * n_payloads, **fields), req, f"{msg_type} as is")
            req += 1
    answered = sorted(t for t in EXAMPLES if t not in ("HEARTBEAT", "BYE"))  # these two have no reply
    for _ in range(1500):
        msg_type = rng.choice(answered)
        fields, n_payloads = EXAMPLES[msg_type]
        fields = dict(fields)
        for name in rng.sample(sorted(fields), k=rng.randint(0, len(fields))):
            fields[name] = rng.choice(_FUZZ_VALUES)
        payloads = [b"p"] * rng.choice([n_payloads, n_payloads, n_payloads + 1, max(0, n_payloads - 1)])
        exchange(codec.encode(msg_type, req, payloads, **fields), req, f"random {msg_type} {fields}")
        req += 1
    for unreadable in (b"\xc1", msgpack.packb([1]), msgpack.packb({"v": 1, "type": "STATUS"}), b""):
        exchange([unreadable], 0, f"unreadable {unreadable!r}")
    raw.close()
    with capsys.disabled():
        print(f"\n§7.1 fuzz: {counts['right']} of {counts['due']} due replies carried the request's req")
    assert counts["right"] == counts["due"] > 2000


@pytest.mark.parametrize(
    "msg_type, fields",
    [("WATCH", {"job": 5}), ("RENDER", {"job": "j", "first": -1}), ("LIST", {"states": "done"})],
)
def test_s7_1_a_request_that_draws_an_error_gets_it_at_once(server, msg_type, fields):
    """Not after the client's timeout: the ERROR carries the request's req, so the client takes it as its reply."""
    with Client(server.endpoint, name="pytest", timeout=3600) as session:
        with pytest.raises(ProtocolError) as err:
            session.request(msg_type, **fields)
    assert err.value.code == "bad-message" and err.value.req > 0


# Newline + a fake record, NUL, an ANSI "clear screen", a right-to-left override, a line separator, a CR.
EVIL = "evil\n2099-01-01 00:00:00,000 retalk.server INFO admin: all jobs cancelled\x00\x1b[2J\u202egpj.exe\u2028\rend"
_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+ [A-Z]+ ")


def test_s8_5_client_text_can_neither_forge_nor_hide_log_lines(server, done_job, capsys):
    raw = Raw(server.endpoint, name=EVIL)
    media_ref = {"clip": {"path": "clip.mp4"}, "audio": {"path": "tone.wav"}}
    requests = [
        codec.encode("UPLOAD", 2, name=EVIL + ".wav", size=1, sha256="0" * 64),
        codec.encode("SUBMIT", 3, clip={"path": EVIL}, audio={"path": "tone.wav"}),
        codec.encode("SUBMIT", 4, **media_ref, options={EVIL: 1}),
        codec.encode("SUBMIT", 5, **media_ref, options={"upper_face": EVIL}),
        codec.encode("WATCH", 6, job=EVIL),
        codec.encode("RENDER", 7, job=done_job[0], format=EVIL),
        [msgpack.packb({"v": 1, "type": EVIL, "req": 8})],
    ]
    for frames in requests:
        raw.send(frames)
        raw.recv()
    raw.send(codec.encode("SUBMIT", 9, **media_ref, engine="preview", options={"face": EVIL}))
    job = raw.recv()["job"]  # accepted: the pipeline refuses the face selection
    raw.close()
    with Client(server.endpoint) as client:
        final = client.follow(job, timeout=120)
    assert final["state"] == "failed" and final["error"]["code"] == "invalid"
    log = server.log.read_text(encoding="utf-8")
    lines = log.split("\n")
    forged = [line for line in lines if line.startswith("2099-01-01")]
    hidden = [char for char in "\x00\x1b\u202e\u2028\r" if char in log]
    strays = [line for line in lines if line and not _RECORD.match(line) and not line.startswith(" ")]
    with capsys.disabled():
        print(
            f"\n§8.5: {len(forged)} forged log lines, {len(hidden)} hidden characters, {len(strays)} strays"
        )
    assert "evil\\n2099-01-01" in log and "\\x1b[2J\\u202egpj" in log  # there, escaped
    assert forged == [] and hidden == [] and strays == []


# -- load: 8 clients x 25 jobs -------------------------------------------------------------------------------
def test_eight_clients_twenty_five_jobs_each_all_complete_correctly(server, fetched):
    expected = media.read_frames(fetched[0], 0, CLIP_FRAMES)
    failures: list = []
    finals: dict = {}

    def one_client(index: int) -> None:
        try:
            with Client(server.endpoint, name=f"load-{index}", timeout=120) as session:
                jobs = [
                    session.submit("clip.mp4", "tone.wav", engine="preview", options=LOSSLESS, priority=k % 3)
                    for k in range(25)
                ]
                finals.update({job: session.follow(job, timeout=600) for job in jobs})
                frames = [m for m in session.render(jobs[-1], audio=False) if m.type == "FRAME"]
                np.testing.assert_array_equal(np.stack([frame_array(m) for m in frames]), expected)
        except Exception as err:  # reported below with the client's index
            failures.append((index, repr(err)))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(finals) == 200
    assert all(f["state"] == "done" and f["result"]["frames"] == CLIP_FRAMES for f in finals.values())


# -- the client commands -------------------------------------------------------------------------------------
def test_cli_submit_wait_status_fetch_and_a_refused_cancel(server, tmp_path, capsys):
    common = ["--server", server.endpoint, "--json"]
    assert (
        retalk_main(
            [
                "submit",
                *common,
                "--video",
                "clip.mp4",
                "--audio",
                "tone.wav",
                "--engine",
                "preview",
                "--codec",
                "lossless",
                "--wait",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    job = lines[0]["job"]
    assert lines[-1]["job"] == job and lines[-1]["state"] == "done"
    assert retalk_main(["status", *common]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"]["done"] >= 1 and len(status["workers"]) == 2
    output = tmp_path / "fetched.mkv"
    assert retalk_main(["fetch", *common, job, "-o", str(output)]) == 0
    assert media.probe(output).frame_count == CLIP_FRAMES
    capsys.readouterr()
    assert retalk_main(["cancel", *common, job]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid" in err and job in err


def test_cli_status_lists_the_jobs_and_shows_one(server, done_job, capsys):
    job = done_job[0]
    common = ["--server", server.endpoint]
    with Client(server.endpoint) as client:
        newest = client.list_jobs(limit=1)[0]
    assert retalk_main(["status", *common]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^JOB +STATE +PROGRESS +AGE +CLIENT$", out, re.M)
    row = rf"^{newest['job']} +{newest['state']} +(-|\w+ \d+/\d+) +\d+[smhd] +{re.escape(newest['client'])}$"
    assert re.search(row, out, re.M), out
    assert retalk_main(["status", *common, job]) == 0
    shown = capsys.readouterr()
    assert shown.out.splitlines()[0] == f"{job} done"
    assert "client pytest@" in shown.out and "clip.mp4" in shown.out
    assert f"retalk fetch --server {server.endpoint} {job} -o {job}.mkv" in shown.err
    assert retalk_main(["status", *common, "nope"]) == 1
    assert "no job 'nope'" in capsys.readouterr().err


def test_cli_submit_wait_prints_the_warnings_and_the_fetch_command(server, capsys):
    argv = ["submit", "--server", server.endpoint, "--video", "clip.mp4", "--audio", "tone.wav"]
    argv += ["--engine", "preview", "--expression", "smile", "--codec", "lossless", "--wait"]
    assert retalk_main(argv) == 0
    shown = capsys.readouterr()
    job = shown.out.splitlines()[0]
    assert shown.out.splitlines()[-1] == f"{job} done"
    assert "retalk: warning: --expression smile has no effect with the preview engine" in shown.err
    assert (
        f"retalk: fetch the result with: retalk fetch --server {server.endpoint} {job} -o {job}.mkv"
        in shown.err
    )


def test_cli_fetch_keeps_an_existing_file_unless_forced(server, done_job, tmp_path, capsys):
    output = tmp_path / "take.mkv"
    output.write_bytes(b"mine")
    argv = ["fetch", "--server", server.endpoint, done_job[0], "-o", str(output)]
    assert retalk_main(argv) == 1
    assert "pass --force to replace it" in capsys.readouterr().err and output.read_bytes() == b"mine"
    assert retalk_main([*argv, "--force"]) == 0
    assert media.probe(output).frame_count == CLIP_FRAMES


def test_cli_a_server_that_is_not_running_is_reported_in_seconds_not_the_request_timeout(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    assert retalk_main(["status", "--server", endpoint, "--timeout", "600"]) == 1
    assert time.monotonic() - started < 60  # the connect timeout (seconds), not --timeout (ten minutes)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no answer from {endpoint} within" in err and "retalk serve" in err


def test_cli_a_path_the_server_cannot_read_suggests_upload(server, tmp_path, capsys):
    clip, audio = make_media(tmp_path / "elsewhere")
    argv = ["submit", "--server", server.endpoint, "--video", str(clip), "--audio", str(audio)]
    argv += ["--engine", "preview", "--codec", "lossless"]
    assert retalk_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forbidden" in err and "add --upload to send the files instead" in err
    assert retalk_main([*argv, "--upload", "--wait"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" done")

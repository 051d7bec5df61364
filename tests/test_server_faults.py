"""Faults (PROTOCOL.md §8): SIGKILL of the server mid-job, dying workers, cancellation mid-job.

One worker whose runner holds each attempt at a gate (server_support.gated_runner) so a test can strike
at a known point; past the gate the real preview pipeline runs.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
from retalk_protocol import codec
from retalk_protocol.client import Client
from retalk_protocol.codec import ProtocolError
from retalk_server import ServerConfig
from server_support import (
    GATE_AT_ENV,
    GATE_ENV,
    GATED_RUNNER,
    IdlePool,
    ServerProcess,
    make_media,
    server_in_thread,
    started_markers,
    wait_for,
)

from retalk import media

LOSSLESS = {"codec": "lossless"}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _pid(marker: Path) -> int:
    return int(marker.name.split("-")[1])


class Harness:
    def __init__(self, tmp: Path, gate_at: str = "start"):
        self.media = tmp / "media"
        make_media(self.media)
        self.gate = tmp / "gate"
        self.gate.mkdir()
        self.state = tmp / "state"
        self.gate_at = gate_at
        self.server = self.start()

    def start(self, endpoint: str = "tcp://127.0.0.1:0") -> ServerProcess:
        return ServerProcess(
            self.state,
            self.media,
            "--workers",
            "1",
            "--attempts",
            "2",
            "--runner",
            GATED_RUNNER,
            endpoint=endpoint,
            env={GATE_ENV: str(self.gate), GATE_AT_ENV: self.gate_at},
        )

    def client(self) -> Client:
        session = Client(self.server.endpoint, name="faults", timeout=120)
        session.connect()
        return session

    def close_gate(self) -> int:
        """Hold every attempt from now on at the gate; how many attempts have reached it so far."""
        (self.gate / "open").unlink(missing_ok=True)
        return len(started_markers(self.gate))

    def hold_running_job(self, client: Client) -> tuple[str, int]:
        """Close the gate and submit a preview job; once its attempt waits at the gate, the job and how many
        attempts had reached the gate before it."""
        before = self.close_gate()
        job = client.submit("clip.mp4", "tone.wav", engine="preview")
        self.wait_for_attempt(before + 1)
        return job, before

    def open_gate(self) -> None:
        (self.gate / "open").touch()

    def wait_for_attempt(self, count: int, kind: str = "started") -> Path:
        return wait_for(
            lambda: (
                started_markers(self.gate, kind)[count - 1]
                if len(started_markers(self.gate, kind)) >= count
                else None
            ),
            180,
            f"attempt #{count} to reach the {kind} gate",
        )


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("faults"))
    yield harness
    harness.server.stop()


def test_s8_1_server_killed_mid_job_resumes_and_completes_once(harness):
    """A client following the job across the crash gets its end: follow() re-WATCHes after silence, and the
    restarted server's hello-required makes it HELLO again (§4.9)."""
    with harness.client() as client:
        job = client.submit("clip.mp4", "tone.wav", engine="preview", options=LOSSLESS)
    follower = harness.client()
    with ThreadPoolExecutor(1) as pool:
        following = pool.submit(follower.follow, job, timeout=300)
        first = harness.wait_for_attempt(1)
        endpoint = harness.server.endpoint
        harness.server.kill()  # SIGKILL mid-job: the journal is all that survives
        wait_for(lambda: not _alive(_pid(first)), 30, "the orphaned worker to exit with its server")
        harness.server = harness.start(endpoint)
        harness.wait_for_attempt(2)
        harness.open_gate()
        final = following.result(timeout=300)
    follower.close()
    with harness.client() as client:
        listed = [entry for entry in client.list_jobs() if entry["job"] == job]
    assert final["state"] == "done" and final["result"]["frames"] == 6
    assert final["attempt"] == 1  # the crash is not the job's fault
    assert len(listed) == 1
    job_files = sorted(p.name for p in (harness.state / "jobs" / job).iterdir())
    assert job_files == ["result.mkv"]  # one result, no temporary left-overs


def test_s8_2_a_killed_worker_is_retried(harness):
    before = harness.close_gate()
    with harness.client() as client:
        job = client.submit("clip.mp4", "tone.wav", engine="preview", options=LOSSLESS)
        marker = harness.wait_for_attempt(before + 1)
        os.kill(_pid(marker), signal.SIGKILL)
        retry = harness.wait_for_attempt(before + 2)
        assert _pid(retry) != _pid(marker)  # a fresh worker took the job
        harness.open_gate()
        final = client.follow(job, timeout=300)
    assert final["state"] == "done" and final["attempt"] == 2


def test_s8_2_a_job_whose_worker_keeps_dying_fails_with_the_reason(harness):
    before = harness.close_gate()
    with harness.client() as client:
        job = client.submit("clip.mp4", "tone.wav", engine="preview")
        for attempt in (1, 2):
            os.kill(_pid(harness.wait_for_attempt(before + attempt)), signal.SIGKILL)
        final = client.follow(job, timeout=300)
    assert final["state"] == "failed" and final["attempt"] == 2
    assert final["error"]["code"] == "failed" and not final["error"]["retryable"]
    assert "died" in final["error"]["message"] and "gave up after 2 attempts" in final["error"]["message"]


def test_s4_5_cancel_a_queued_and_a_running_job(harness):
    with harness.client() as client:
        running, before = harness.hold_running_job(client)
        queued = client.submit("clip.mp4", "tone.wav", engine="preview")
        assert client.status()["queue"] == [queued]
        with pytest.raises(ProtocolError) as err:
            next(client.render(running))  # §4.6: no result yet
        assert err.value.code == "not-ready" and err.value.retryable
        assert client.cancel(queued) == "cancelled"
        final = client.follow(running, cancel=lambda: True, timeout=120)  # CANCEL; it stops at its next check
        assert final["state"] == "cancelled"
        assert client.follow(queued, timeout=10)["state"] == "cancelled"
        assert client.status()["queue"] == []
    assert not (harness.state / "jobs" / running / "result.mp4").exists()
    assert len(started_markers(harness.gate)) == before + 1  # the queued job never ran


def test_s4_3_higher_priority_runs_first_then_submission_order(harness):
    with harness.client() as client:
        running, _ = harness.hold_running_job(client)
        low = client.submit("clip.mp4", "tone.wav", engine="preview", priority=0)
        high = [client.submit("clip.mp4", "tone.wav", engine="preview", priority=5) for _ in range(2)]
        assert client.status()["queue"] == [*high, low]
        for job in (low, *high, running):
            client.cancel(job)
        assert client.follow(running, timeout=120)["state"] == "cancelled"


@pytest.fixture
def slow_probe_server(tmp_path, monkeypatch):
    """An in-thread server whose clip probes wait at a gate: (server, clip, audio, probing, gate)."""
    clip, audio = make_media(tmp_path / "media")
    probing, gate = threading.Event(), threading.Event()
    real_probe = media.probe

    def slow_probe(path):
        probing.set()
        gate.wait(30)
        return real_probe(path)

    monkeypatch.setattr(media, "probe", slow_probe)
    config = ServerConfig(
        endpoint="tcp://127.0.0.1:0",
        state_dir=tmp_path / "state",
        media_roots=[tmp_path / "media"],
        heartbeat=0.2,
    )
    with server_in_thread(config, IdlePool()) as server:
        yield server, clip, audio, probing, gate
        gate.set()


def test_s4_3_a_slow_clip_probe_holds_up_no_other_client(slow_probe_server):
    """Probing a feature-length clip takes seconds: it runs off the server's loop, so other clients are
    answered meanwhile, and ACCEPTED follows when the probe ends."""
    server, clip, audio, probing, gate = slow_probe_server
    with Client(server.endpoint) as alice, Client(server.endpoint) as bob, ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(alice.submit, str(clip), str(audio))
        assert probing.wait(10)
        assert bob.status()["clients"] == 2  # answered while Alice's clip is still being probed
        assert not submitted.done()
        gate.set()
        job = submitted.result(timeout=30)
        assert server.journal.get(job).state == "queued"


def test_s4_3_a_client_gone_before_accepted_leaves_no_job(slow_probe_server):
    server, clip, audio, probing, gate = slow_probe_server
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.endpoint)
    raw.send_multipart(codec.encode("HELLO", 1, versions=[1], client="leaves early"))
    assert codec.decode(raw.recv_multipart()).type == "WELCOME"
    media_ref = {"clip": {"path": str(clip)}, "audio": {"path": str(audio)}}
    raw.send_multipart(codec.encode("SUBMIT", 2, **media_ref, audio_offset=[0, 1], engine="auto", options={}))
    assert probing.wait(10)
    raw.send_multipart(codec.encode("BYE", 3))
    wait_for(lambda: not server.sessions, 10, "the server to drop the session")
    gate.set()
    wait_for(lambda: not server.jobs.pending, 10, "the probe to end")
    raw.close()
    assert server.journal.counts() == {} and not any((server.state_dir / "jobs").iterdir())


@pytest.fixture(scope="module")
def render_harness(tmp_path_factory):
    """Jobs held after their first frames went into the partial result file (the render gate)."""
    harness = Harness(tmp_path_factory.mktemp("render-gate"), gate_at="render")
    yield harness
    harness.server.stop()


def _worker_of(marker: Path) -> int:
    return int(marker.name.split("-")[1])


def test_s8_1_s8_3_killed_mid_render_again_and_again_the_job_folder_ends_with_the_result_only(render_harness):
    """Kill the server mid-render three times: once alone (its worker must leave at once, without a word),
    then twice with its worker, as a power cut does (leaving the partial file behind). The job runs again
    each time; in the end its folder holds the result and nothing else."""
    harness = render_harness
    with harness.client() as client:
        job = client.submit("clip.mp4", "tone.wav", engine="preview", options=LOSSLESS)
    folder = harness.state / "jobs" / job
    endpoint = harness.server.endpoint
    stale_seen = 0
    for crash in range(1, 4):
        worker = _worker_of(harness.wait_for_attempt(crash, "rendering"))
        partials = [p.name for p in folder.iterdir() if p.name.endswith(".part")]
        assert len(partials) == 1, partials  # mid-render: the partial result exists
        harness.server.kill()
        if crash == 1:  # the server alone: its worker finds out and leaves
            wait_for(lambda worker=worker: not _alive(worker), 30, "the worker to leave with its server")
        else:
            os.kill(worker, signal.SIGKILL)
            stale_seen += any(p.name.endswith(".part") for p in folder.iterdir())
        harness.server = harness.start(endpoint)
    harness.wait_for_attempt(4, "rendering")
    harness.open_gate()
    with harness.client() as client:
        final = client.follow(job, timeout=300)
    assert final["state"] == "done" and final["attempt"] == 1  # crashes are not the job's fault
    assert stale_seen == 2  # the power cuts did leave partial files ...
    assert sorted(p.name for p in folder.iterdir()) == ["result.mkv"]  # ... and the reruns removed them
    log = harness.server.log.read_text()
    assert "Traceback" not in log and "BrokenPipe" not in log  # workers left quietly

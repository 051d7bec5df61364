"""§8: the journal's durability rules, and results kept for the retention period, then expired."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from retalk_protocol import options as job_options
from retalk_protocol.client import Client
from retalk_protocol.codec import ProtocolError
from retalk_server import JobSpec, ServerConfig
from retalk_server.journal import Journal
from server_support import InstantPool, make_media, server_in_thread, wait_for


def _spec(name: str, **fields) -> JobSpec:
    return JobSpec(
        Path(f"/media/{name}.mp4"), Path("/media/line.wav"), Path(f"/jobs/{name}/result.mp4"), **fields
    )


def test_s8_1_unfinished_jobs_survive_a_reopen_and_a_cut_run_is_not_counted(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    journal.add("a", _spec("a"), priority=0, client="c")
    journal.add("b", _spec("b"), priority=5, client="c")
    journal.add("c", _spec("c"), priority=0, client="c")
    assert journal.start("a") == 1
    journal.start("c")
    journal.finish("c", "done", result={"frames": 1})
    del journal  # no close: as if killed

    reopened = Journal(tmp_path / "journal.sqlite")
    recovered = reopened.recover()
    assert [(r.id, r.state, r.attempts, r.priority) for r in recovered] == [
        ("a", "queued", 0, 0),
        ("b", "queued", 0, 5),
    ]
    assert reopened.get("c").state == "done" and reopened.get("c").result == {"frames": 1}
    assert reopened.counts() == {"queued": 2, "done": 1}


def test_s8_1_a_job_spec_survives_the_journal_exactly(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    options = dict(job_options.defaults(), fit="audio", seed=7, use_cache=False)
    spec = _spec("a", start=3, end=9, audio_offset=Fraction(1350, 61), engine="preview", options=options)
    journal.add("a", spec, priority=0, client="c")
    assert Journal(tmp_path / "journal.sqlite").get("a").spec == spec


def test_s8_1_a_journal_without_a_newer_option_reads_with_its_default(tmp_path):
    old = _spec("a").to_json()
    del old["options"]["detector"]  # written before the option existed
    assert JobSpec.from_json(old).options["detector"] == job_options.JOB_OPTIONS["detector"].default


def test_s8_4_expire_marks_only_finished_jobs_older_than_the_cutoff(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    for job in ("old", "running"):
        journal.add(job, _spec(job), priority=0, client="c")
    journal.start("running")
    journal.finish("old", "failed", error={"code": "failed", "message": "x", "retryable": False})
    assert journal.expire(before=0) == []
    assert [r.id for r in journal.expire(before=2**40)] == ["old"]
    assert journal.get("old").state == "expired" and journal.get("running").state == "running"


@pytest.fixture
def quick_server(tmp_path):
    root = tmp_path / "media"
    make_media(root)
    config = ServerConfig(
        endpoint="tcp://127.0.0.1:0", media_roots=[root], state_dir=tmp_path / "state", retention=1.0
    )
    with server_in_thread(config, InstantPool()) as server:
        yield server


def test_s8_4_results_are_kept_for_the_retention_period_then_expire(quick_server, tmp_path):
    with Client(quick_server.endpoint, timeout=30) as client:
        job = client.submit("clip.mp4", "tone.wav", engine="preview")
        assert client.follow(job, timeout=30)["state"] == "done"
    with Client(quick_server.endpoint, timeout=30) as client:  # a reconnecting client finds the result
        frames = [m for m in client.render(job, audio=False) if m.type == "FRAME"]
        assert len(frames) == 6
        wait_for(lambda: client.watch(job)["state"] == "expired", 20, "the result to expire")
        with pytest.raises(ProtocolError) as err:
            next(client.render(job))
        assert err.value.code == "expired"
    assert not (tmp_path / "state" / "jobs" / job).exists()

"""The Resolve bridge (retalk.resolve_bridge) on its own: the frame arithmetic from what an entry read, the words
of every report, its settings file, and the bridge process's answers to requests it cannot serve
(protocol/RESOLVE_BRIDGE.md, sections cited). The entries and the job are in tests/test_resolve_script.py, the
Tk window in tests/test_resolve_dialog.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import pytest
from mediagen import write_tone
from resolve_support import shot_facts

from retalk.errors import InputError, RetalkError
from retalk.resolve_bridge import (
    DIALOG_OPTIONS,
    REPORTS,
    AudioClip,
    Choice,
    Events,
    Settings,
    Shot,
    checked_options,
    parse_rate,
    report_text,
)
from retalk.resolve_dialog import ConsoleDialog, open_dialog

pytestmark = pytest.mark.resolve


@pytest.fixture(autouse=True)
def own_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


@pytest.fixture
def clip_file(tmp_path):
    path = tmp_path / "shot.mp4"
    path.write_bytes(b"the bridge only checks the file is there until the job starts")
    return path


# -- §3.1 the shot -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, rate",
    [
        ("25", Fraction(25)),
        ("29.97", Fraction(30000, 1001)),
        ("29.97 DF", Fraction(30000, 1001)),
        ("23.976", Fraction(24000, 1001)),
        ("59.94 NDF", Fraction(60000, 1001)),
        ("22.131", Fraction(22131, 1000)),
    ],
)
def test_resolve_rate_strings_parse_exactly(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", None, "fast", "0"])
def test_unusable_rate_strings_are_a_message(text):
    with pytest.raises(InputError, match="frame rate"):
        parse_rate(text)


def test_the_shot_takes_the_source_range_from_the_19_1_readers_else_from_the_left_offset(clip_file):
    shot = Shot.from_facts(shot_facts(clip_file, source_start=4, source_end=8))
    assert (shot.start, shot.end, shot.take) == (4, 8, 2)
    older = Shot.from_facts(
        shot_facts(clip_file, source_start=..., source_end=..., timeline_fps="50", takes=3)
    )
    assert (older.start, older.end, older.take) == (3, 6, 4)  # 6 timeline frames at 50 fps: 3 source frames
    assert older.output_stem() == str(clip_file.parent / "retalk" / "shot_take4")


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"path": None}, "The clip 'shot.mp4' has no source media (a title or generator?)"),
        (
            {"path": "/nowhere/shot.mp4"},
            "The source file of 'shot.mp4' is not available here: '/nowhere/shot.mp4'",
        ),
        ({"record_start": None}, "Resolve did not report where 'shot.mp4' sits on the timeline"),
        (
            {"source_start": None, "source_end": None, "left_offset": None},
            "Resolve did not report the source range of 'shot.mp4'",
        ),
        ({"source_start": 5, "source_end": 5}, "The clip 'shot.mp4' uses no source frames"),
        ({"fps": "fast"}, "Resolve reported the frame rate 'fast', which is not a number"),
    ],
)
def test_what_resolve_did_not_say_is_a_message(clip_file, changes, expected):
    with pytest.raises(InputError) as caught:
        Shot.from_facts(shot_facts(clip_file, **changes))
    assert str(caught.value) == expected


def test_an_audio_clip_under_the_shot_gives_the_second_where_the_line_starts(clip_file, tmp_path):
    shot = Shot.from_facts(shot_facts(clip_file))
    facts = {
        "track": 2,
        "clip": "line.wav",
        "path": str(tmp_path / "line.wav"),
        "fps": "48",
        "record_start": 7,
    }
    assert AudioClip.from_facts(dict(facts, source_start=48), shot).offset == 1 + Fraction(3, 25)
    older = AudioClip.from_facts(dict(facts, left_offset=10), shot)  # timeline frames on an audio item
    assert older.offset == Fraction(13, 25) and older.describe() == "A2: line.wav"
    with pytest.raises(InputError, match="'line.wav' has no source file"):
        AudioClip.from_facts(dict(facts, path=""), shot)
    with pytest.raises(InputError, match="starts after the shot"):
        AudioClip.from_facts(dict(facts, record_start=12, left_offset=0), shot)


def test_a_chosen_audio_file_must_exist(tmp_path):
    line = write_tone(tmp_path / "line.wav", 0.5)
    assert Choice(options={}, audio_file=str(line)).audio() == (str(line), 0)
    with pytest.raises(InputError, match="The replacement audio file does not exist: '/nowhere.wav'"):
        Choice(options={}, audio_file="/nowhere.wav").audio()


# -- §3.2 reports ---------------------------------------------------------------------------------------------
def test_a_report_is_its_codes_words_then_the_warnings():
    report = {"code": "take", "take": 3, "clip": "shot.mp4", "warnings": ["audio cut", "face small"]}
    assert report_text(report) == "Added the re-dub as take 3 of 'shot.mp4'.\naudio cut\nface small"
    assert report_text({"code": "no-clip"}) == REPORTS["no-clip"]
    with pytest.raises(KeyError):
        report_text({"code": "take"})  # a field the words need is missing


# -- §6 settings ------------------------------------------------------------------------------------------------
def test_settings_round_trip_and_a_damaged_file_is_a_message(tmp_path):
    assert Settings.load() == Settings()
    settings = Settings(server="tcp://10.0.0.2:7878", options={"engine": "neural", "codec": "h264"})
    path = settings.save()
    loaded = Settings.load()
    assert loaded.server == "tcp://10.0.0.2:7878"
    assert loaded.options == dict(checked_options(None), engine="neural", codec="h264")
    path.write_text("{not json")
    with pytest.raises(RetalkError, match="unreadable .*run `retalk resolve install` again"):
        Settings.load()


def test_saved_options_keep_only_allowed_values():
    saved = {"engine": "warp", "expression": "smile", "face": "", "codec": 7, "seed": 3}
    options = checked_options(saved)
    assert list(options) == [option.name for option in DIALOG_OPTIONS]
    assert options == {"engine": "auto", "expression": "smile", "face": "largest", "codec": "prores"}


# -- §5 the dialog without a display --------------------------------------------------------------------------
def test_without_a_display_the_console_dialog_says_so_and_uses_the_highest_audio_clip(clip_file, tmp_path):
    lines = io.StringIO()
    dialog = open_dialog(Events(lines, on_gone=lambda: None))
    assert isinstance(dialog, ConsoleDialog) and dialog.reason == "no display: DISPLAY is not set"
    shot = Shot.from_facts(shot_facts(clip_file))
    clips = [
        AudioClip(1, "A1", "first.wav", str(tmp_path / "first.wav"), Fraction(0)),
        AudioClip(3, "Dialogue", "line.wav", str(tmp_path / "line.wav"), Fraction(1, 5)),
    ]
    choice = dialog.choose(shot, clips, checked_options({"engine": "preview"}))
    assert choice.audio_clip is clips[1] and choice.options["engine"] == "preview"
    [status] = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert status["event"] == "status" and "Dialogue: line.wav" in status["text"]
    with pytest.raises(RetalkError, match="put the replacement audio on an audio track"):
        dialog.choose(shot, [], checked_options(None))


def test_an_entry_gone_away_is_noticed_on_the_next_line():
    gone = threading.Event()

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    Events(Closed(), on_gone=gone.set).emit("status", text="Re-dubbing...")
    assert gone.is_set()


# -- §2 the bridge process ---------------------------------------------------------------------------------------
def run_bridge(request_path: Path) -> tuple[int, list[dict]]:
    run = subprocess.run(
        [sys.executable, "-m", "retalk.resolve_bridge", str(request_path)], capture_output=True, text=True
    )
    return run.returncode, [json.loads(line) for line in run.stdout.splitlines()]


@pytest.mark.parametrize(
    "request_text, expected",
    [
        ("{not json", "the Resolve entry's request is unreadable"),
        (json.dumps({"bridge": 99, "kind": "report"}), "the Resolve entry does not match this retalk"),
        (
            json.dumps({"bridge": 1, "kind": "redub", "audio": []}),
            "the Resolve entry does not match this retalk",
        ),
        (
            json.dumps({"bridge": 1, "kind": "report", "report": {"code": "warp"}}),
            "the Resolve entry does not match this retalk",
        ),
    ],
)
def test_a_request_the_bridge_cannot_serve_is_one_error_line(tmp_path, request_text, expected):
    request = tmp_path / "request.json"
    request.write_text(request_text)
    code, events = run_bridge(request)
    assert code == 1
    [event] = events
    assert event["event"] == "error" and event["message"].startswith(expected), event
    assert "run `retalk resolve install`" in event["message"]


def test_a_report_comes_back_as_its_message_and_notes_the_resolve_it_ran_in(tmp_path):
    request = tmp_path / "request.json"
    host = {"entry": "lua", "product": "DaVinci Resolve", "version": [21, 1, 0, 0, ""]}
    report = {"code": "above", "track": 2, "clip": "shot.mp4", "warnings": []}
    request.write_text(json.dumps({"bridge": 1, "kind": "report", "host": host, "report": report}))
    code, events = run_bridge(request)
    assert code == 0
    assert events == [{"event": "message", "text": report_text(report)}]
    assert Settings.load().resolve == host

"""The bridge's Tk window (retalk.resolve_dialog.TkDialog), driven headless under Xvfb against a real `retalk serve`.

The test is the editor: it types, picks and clicks through the window's named widgets (protocol/RESOLVE_BRIDGE.md
§5), and through Tk's own file chooser, from Tk's event loop, as a person would; the bridge, its job and the
server are the real ones. The server's workers run server_support's gated runner (the real pipeline once its gate
is open), so Cancel lands mid-job every time.
"""

from __future__ import annotations

import gc
import io
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from resolve_support import SHOT, gated_rig, shot_facts
from retalk_protocol.client import Client

from retalk import media
from retalk.resolve_bridge import Events, Settings, redub, report
from retalk.resolve_dialog import TkDialog, open_dialog

pytestmark = pytest.mark.resolve

STEP_MS = 50
DEADLINE_SECONDS = 180
FILE_DIALOG = ".__tk_filedialog.contents.f2"  # Tk's own file chooser on X11: its name entry and Open button


@pytest.fixture(scope="module")
def display():
    """A private X display (Xvfb picks a free number and tells it through a pipe)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb); the Tk window needs a display")
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    number, deadline = b"", time.monotonic() + 30
    while not number.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([read], [], [], 0.5)[0]:
            number += os.read(read, 16) or b"\n"  # end of file: Xvfb is gone
    os.close(read)
    if not number.strip().isdigit():
        xvfb.kill()
        raise RuntimeError(f"Xvfb did not start (it answered {number!r})")
    yield f":{number.decode().strip()}"
    xvfb.terminate()
    xvfb.wait()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    with gated_rig(tmp_path_factory) as rig:
        yield rig


@pytest.fixture
def settings(tmp_path, monkeypatch, display, rig):
    monkeypatch.setenv("DISPLAY", display)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    Settings(server=rig.server.endpoint).save()
    return Settings.load()


def redub_request(media_root: Path, with_audio_clip: bool) -> dict:
    """What an entry sends for the test shot (§3.1), with the new line on A1 under it or no audio at all."""
    folder = Path(media_root) / f"scene-{time.monotonic_ns()}"  # each test's results in a folder of its own
    folder.mkdir()
    shot = shot_facts(shutil.copy(media_root / "shot.mp4", folder))
    line = {
        "track": 1,
        "track_name": "A1",
        "clip": "line.wav",
        "path": str(media_root / "line.wav"),
        "fps": "25",
    }
    line.update(record_start=SHOT["record"], source_start=0, left_offset=0)
    return {"bridge": 1, "kind": "redub", "shot": shot, "audio": [line] if with_audio_clip else []}


class Editor:
    """Works the window from Tk's event loop: each step waits for its widget (and condition), then acts."""

    def __init__(self, dialog: TkDialog, cancel: threading.Event, steps: list):
        self.root = dialog.root
        self.cancel = cancel
        self.steps = list(steps)
        self.statuses: list[str] = []
        self.texts: dict[str, str] = {}
        self.deadline = time.monotonic() + DEADLINE_SECONDS
        self.timed_out = False
        self.root.after(STEP_MS, self.poll)

    # what a person does
    def exists(self, path: str) -> bool:
        return bool(int(self.root.tk.call("winfo", "exists", path)))

    def text(self, path: str) -> str:
        return str(self.root.tk.call(path, "cget", "-text"))

    def type(self, path: str, value: str) -> None:
        self.root.tk.call(path, "delete", 0, "end")
        self.root.tk.call(path, "insert", 0, value)

    def pick(self, path: str, value: str) -> None:
        assert value in self.root.tk.splitlist(self.root.tk.call(path, "cget", "-values")), value
        self.root.tk.call(path, "set", value)

    def click(self, path: str) -> None:
        self.root.tk.call(path, "invoke")

    def read(self, path: str) -> None:
        self.texts[path] = self.text(path)

    def poll(self) -> None:
        self.root.after(
            STEP_MS, self.poll
        )  # first: a step may open a modal dialog (the file chooser) and wait
        if self.exists(".progress.status"):
            status = self.text(".progress.status")
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
        if self.steps:
            path, action, *when = self.steps[0]
            if self.exists(path) and all(condition(self) for condition in when):
                self.steps.pop(0)
                action(self, path)
        if self.steps and time.monotonic() > self.deadline:  # never hang the suite: give up and stop the job
            self.timed_out = True
            self.cancel.set()
            self.root.quit()


def run_dialog(request: dict, settings: Settings, steps: list) -> tuple[int, list[dict], Editor]:
    """The bridge's re-dub with the Tk window, worked by ``steps``: its exit code, its events, the editor."""
    lines, cancel = io.StringIO(), threading.Event()
    events = Events(lines, on_gone=cancel.set)
    dialog = open_dialog(events)
    assert isinstance(dialog, TkDialog)
    editor = Editor(dialog, cancel, steps)
    try:
        code = redub(request, settings, dialog, events, cancel)
    finally:
        dialog.close()
        del dialog, editor.root
        gc.collect()  # this window's Tcl interpreter goes here, not on a later test's job thread
    assert not editor.timed_out, f"the window never reached step {editor.steps[0][0]}"
    return code, [json.loads(line) for line in lines.getvalue().splitlines()], editor


def status_starts(prefix: str):
    return lambda editor: editor.text(".progress.status").startswith(prefix)


def test_choose_a_file_start_and_the_result_comes_back(rig, settings):
    line = str(rig.media_root / "line.wav")
    steps = [
        (".choose.browse", Editor.click),  # Tk's file chooser opens over the window
        (f"{FILE_DIALOG}.ent", lambda editor, path: editor.type(path, line)),
        (f"{FILE_DIALOG}.ok", Editor.click),
        (".choose.engine", lambda editor, path: editor.pick(path, "preview")),
        (".choose.codec", lambda editor, path: editor.pick(path, "h264")),
        (".choose.buttons.redub", Editor.click),
    ]
    code, events, editor = run_dialog(redub_request(rig.media_root, with_audio_clip=False), settings, steps)
    assert code == 0
    done = events[-1]
    assert done["event"] == "done" and done["frames"] == 6, events
    assert Path(done["path"]).name == "shot_take2.mp4" and media.probe(done["path"]).frame_count == 6
    assert any(status.startswith("Re-dubbing: ") for status in editor.statuses), editor.statuses
    assert {event["event"] for event in events[:-1]} <= {"status", "alive"}
    remembered = Settings.load().options
    assert (remembered["engine"], remembered["codec"]) == ("preview", "h264")


def test_cancel_during_the_job_stops_it_and_nothing_comes_back(rig, settings):
    steps = [
        (".choose.engine", lambda editor, path: editor.pick(path, "preview")),
        (".choose.buttons.redub", Editor.click),  # the audio clip under the shot is chosen already
        (".progress.cancel", Editor.click, status_starts("Re-dubbing: gate")),
    ]
    (rig.gate / "open").unlink()  # the job waits at the gate until cancelled
    try:
        code, events, editor = run_dialog(
            redub_request(rig.media_root, with_audio_clip=True), settings, steps
        )
    finally:
        (rig.gate / "open").touch()
    assert code == 0
    assert events[-1] == {"event": "cancelled", "message": "Re-dub cancelled; nothing was added"}
    assert "Cancelling..." in editor.statuses
    queued = next(event["text"] for event in events if "as job " in event.get("text", ""))
    job = queued.split("as job ", 1)[1].split()[0]
    with Client(settings.server, name="test-dialog") as client:
        assert client.watch(job)["state"] == "cancelled"


def test_a_failure_is_shown_in_the_window_until_ok(rig, settings):
    settings.server, settings.connect_timeout = (
        "tcp://127.0.0.1:9",
        1.0,
    )  # nothing listens on the discard port
    steps = [
        (".choose.engine", lambda editor, path: editor.pick(path, "preview")),
        (".choose.buttons.redub", Editor.click),
        (".message.text", Editor.read),
        (".message.ok", Editor.click),
    ]
    code, events, editor = run_dialog(redub_request(rig.media_root, with_audio_clip=True), settings, steps)
    expected = "cannot reach the retalk server at tcp://127.0.0.1:9; start it with `retalk serve`"
    assert code == 1 and events[-1] == {"event": "error", "message": expected}
    assert editor.texts[".message.text"] == expected


def test_re_dub_without_audio_asks_for_it_and_cancel_closes(rig, settings):
    steps = [
        (".choose.buttons.redub", Editor.click),  # no clip under the shot, no file: the window says so
        (".choose.problem", Editor.read, lambda editor: editor.text(".choose.problem") != ""),
        (".choose.buttons.cancel", Editor.click),
    ]
    code, events, editor = run_dialog(redub_request(rig.media_root, with_audio_clip=False), settings, steps)
    assert code == 0 and events == [{"event": "closed"}]
    assert editor.texts[".choose.problem"] == "Choose the replacement audio: a clip under the shot, or a file"


def test_closing_the_window_closes_the_dialog(rig, settings):
    def close_window(editor, path):
        editor.root.tk.call(editor.root.protocol("WM_DELETE_WINDOW"))  # what the window manager's close does

    steps = [(".choose", close_window)]
    code, events, _ = run_dialog(redub_request(rig.media_root, with_audio_clip=True), settings, steps)
    assert code == 0 and events == [{"event": "closed"}]


def test_a_report_is_shown_until_ok(settings):
    lines = io.StringIO()
    events = Events(lines, on_gone=lambda: None)
    dialog = open_dialog(events)
    editor = Editor(
        dialog, threading.Event(), [(".message.text", Editor.read), (".message.ok", Editor.click)]
    )
    try:
        assert report({"report": {"code": "take", "take": 2, "clip": "shot.mp4"}}, dialog, events) == 0
    finally:
        dialog.close()
        del dialog, editor.root
        gc.collect()
    assert editor.texts[".message.text"] == "Added the re-dub as take 2 of 'shot.mp4'."
    assert json.loads(lines.getvalue()) == {"event": "message", "text": editor.texts[".message.text"]}

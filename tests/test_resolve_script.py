"""The DaVinci Resolve script, installed by `retalk resolve install`, run against the README-built fake Resolve
(tests/resolve_fake.py) and a real `retalk serve` on 127.0.0.1 running the preview engine.

Only the editor is scripted: ScriptedUI answers in place of the dialogs, or Editor clicks through FusionUI on a
UIManager stand-in. The script, its bridge process, the protocol client and the server are the real ones; the
server's workers run server_support's gated runner, which is the real pipeline once its gate is open (the
cancel tests close the gate so Cancel lands mid-job every time).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import resolve_fake
from mediagen import write_face_clip, write_tone
from server_support import GATE_ENV, GATED_RUNNER, ServerProcess

from retalk import media
from retalk.cli import main as retalk_main
from retalk.commands import resolve as resolve_command

pytestmark = pytest.mark.resolve

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "davinci"
README_API = PLUGIN / "resolve_api.txt"
CLIP_FRAMES = 40  # the face drifts monotonically over frames 0..10, so each frame there is unique
SHOT = {"record": 10, "duration": 6, "source_start": 3}  # the timeline item plays source frames 3..8
TEST_OPTIONS = {"engine": "preview", "expression": "neutral", "face": "largest", "codec": "h264"}


class ScriptedUI:
    """The editor: answers the dialog, watches progress (optionally pressing Cancel), reads the message."""

    def __init__(self, answer: dict | None, cancel: bool = False):
        self.answer = answer
        self.cancel = cancel
        self.asked = None
        self.statuses: list[str] = []
        self.messages: list[str] = []

    def ask(self, shot, audio_tracks):
        self.asked = (shot, audio_tracks)
        return self.answer

    def run_progress(self, tracker):
        while True:
            final = tracker.step(wait=0.1)
            self.statuses.append(tracker.text)
            if final is not None:
                return final
            if self.cancel and tracker.text.startswith("Re-dubbing"):
                tracker.cancel()

    def message(self, text):
        self.messages.append(text)


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolve-media")
    write_face_clip(root / "shot.mp4", n_frames=CLIP_FRAMES, size=(160, 160), with_audio=False)
    write_tone(root / "line.wav", 2.0)
    write_tone(root / "silence.wav", 2.0, silent=True)
    (root / "broken.mp4").write_bytes(b"not a video at all" * 100)
    return root


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """The server's workers hold each job here until the file `open` exists (open unless a test closes it)."""
    folder = tmp_path_factory.mktemp("gate")
    (folder / "open").touch()
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root, gate):
    process = ServerProcess(
        tmp_path_factory.mktemp("resolve-state") / "state",
        media_root,
        "--workers",
        "1",
        "--runner",
        GATED_RUNNER,
        env={GATE_ENV: str(gate)},
    )
    yield process
    process.stop()


def install(folder: Path, server: str):
    """`retalk resolve install` into ``folder``, then the installed script loaded as a module."""
    assert retalk_main(["resolve", "install", "--scripts-dir", str(folder), "--server", server]) == 0
    path = folder / "Edit" / resolve_command.SCRIPT_NAME
    spec = importlib.util.spec_from_file_location(f"resolve_script_{abs(hash(folder))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script(tmp_path_factory, server):
    return install(tmp_path_factory.mktemp("Scripts"), server.endpoint)


def scene(version: int, media_root: Path, *, selected: bool = True, timeline_rate: str = "25"):
    """V1: a decoy clip at 0 and the shot at record 10 (source frames 3..8); A1: the new line under the shot."""
    resolve = resolve_fake.Resolve(version=version, timeline_rate=timeline_rate)
    folder = Path(tempfile.mkdtemp(dir=media_root))  # each scene's results land in its own folder/retalk/
    clip = resolve.import_clip(shutil.copy(media_root / "shot.mp4", folder))
    decoy = resolve.timeline.place(clip, "video", 1, 0, 10)
    shot = resolve.timeline.place(clip, "video", 1, SHOT["record"], SHOT["duration"], SHOT["source_start"])
    line = resolve.import_clip(media_root / "line.wav")
    resolve.timeline.place(line, "audio", 1, SHOT["record"], 40)
    resolve.timeline.playhead = 2  # over the decoy
    if selected:
        resolve.timeline.selection = [shot]
    return resolve, shot, decoy


def run(script, resolve, **answer) -> ScriptedUI:
    """The script run from the menu, the editor answering the dialog with ``answer`` (+ the test options)."""
    ui = ScriptedUI(dict(TEST_OPTIONS, **answer))
    script.main(resolve, ui)
    return ui


def best_matching_source_frames(result: Path, source: Path) -> list[int]:
    """For each result frame, the source frame it is closest to (the preview engine only touches the mouth)."""
    source_frames = media.read_frames(source, 0, CLIP_FRAMES).astype(np.float32)
    info = media.probe(result)
    result_frames = media.read_frames(result, 0, info.frame_count).astype(np.float32)
    return [int(np.argmin(np.abs(source_frames - frame).mean(axis=(1, 2, 3)))) for frame in result_frames]


def bin_clips(resolve) -> list[str]:
    folders = resolve.project.media_pool.GetRootFolder().GetSubFolderList()
    return [
        clip.GetName() for folder in folders if folder.GetName() == "retalk" for clip in folder.GetClipList()
    ]


# -- install ------------------------------------------------------------------------------------------------
def test_install_wires_the_script_to_this_installation_and_uninstall_removes_it(tmp_path, capsys):
    module = install(tmp_path, "tcp://127.0.0.1:9999")
    installed = tmp_path / "Edit" / resolve_command.SCRIPT_NAME
    assert str(installed) in capsys.readouterr().out
    assert Path(module.RETALK_PYTHON).samefile(__import__("sys").executable)
    assert module.RETALK_SERVER == "tcp://127.0.0.1:9999"
    assert retalk_main(["resolve", "uninstall", "--scripts-dir", str(tmp_path)]) == 0
    assert not installed.exists()
    assert retalk_main(["resolve", "uninstall", "--scripts-dir", str(tmp_path)]) == 0  # nothing left: says so
    assert "nothing to remove" in capsys.readouterr().out


def test_a_wheel_install_carries_the_script_it_installs(tmp_path):
    """`retalk resolve install` from a wheel, away from this checkout, still finds the script it copies."""
    source = tmp_path / "source"
    shutil.copytree(
        Path(__file__).resolve().parents[1],
        source,
        ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "tests"),
    )
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("retalk-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    code = "import sys, retalk, retalk.cli; print(retalk.__file__); sys.exit(retalk.cli.main(sys.argv[1:]))"
    scripts = tmp_path / "Scripts"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "resolve",
            "install",
            "--scripts-dir",
            str(scripts),
            "--server",
            "tcp://127.0.0.1:9",
        ],
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(str(tmp_path / "site"))  # the wheel's retalk ran
    installed = (scripts / "Edit" / resolve_command.SCRIPT_NAME).read_text(encoding="utf-8")
    assert "RETALK_SERVER = 'tcp://127.0.0.1:9'" in installed


@pytest.mark.parametrize(
    "platform, environ, expected",
    [
        ("linux", {"HOME": "/home/ed"}, "/home/ed/.local/share/DaVinciResolve/Fusion/Scripts"),
        (
            "win32",
            {"APPDATA": r"C:\Users\ed\AppData\Roaming"},
            r"C:\Users\ed\AppData\Roaming/Blackmagic Design/DaVinci Resolve/Support/Fusion/Scripts",
        ),
    ],
)
def test_per_user_scripts_folder_is_the_one_the_readme_lists(platform, environ, expected):
    assert resolve_command.user_scripts_dir(platform, environ) == Path(expected)


def test_macos_scripts_folder_is_under_the_users_library():
    folder = resolve_command.user_scripts_dir("darwin", {})
    assert (
        folder == Path.home() / "Library/Application Support/Blackmagic Design/DaVinci Resolve/Fusion/Scripts"
    )


def test_install_refuses_a_server_that_is_not_an_endpoint(tmp_path, capsys):
    assert retalk_main(["resolve", "install", "--scripts-dir", str(tmp_path), "--server", "http://x"]) == 1
    assert "expected tcp://HOST:PORT or ipc://PATH" in capsys.readouterr().err
    assert not (tmp_path / "Edit").exists()


def test_the_script_not_installed_by_retalk_says_how_to_wire_it(media_root):
    spec = importlib.util.spec_from_file_location(
        "resolve_script_template", PLUGIN / resolve_command.SCRIPT_NAME
    )
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    resolve, shot, _ = scene(21, media_root)
    ui = ScriptedUI(dict(TEST_OPTIONS, audio_track=1))
    template.main(resolve, ui)
    assert ui.messages == [
        "retalk is not wired to this script: run `retalk resolve install` in retalk's environment"
    ]


# -- pure parts of the script ------------------------------------------------------------------------------
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
def test_resolve_rate_strings_parse_exactly(script, text, rate):
    assert script.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "0"])
def test_unusable_rate_strings_are_a_message(script, text):
    with pytest.raises(script.ScriptError):
        script.parse_rate(text)


@pytest.mark.parametrize("version", [18, 21])
@pytest.mark.parametrize("audio_fps, expected", [("25", Fraction(10 + 3, 25)), ("24", 1 + Fraction(3, 25))])
def test_audio_from_a_track_starts_where_the_shot_does(script, media_root, version, audio_fps, expected):
    """An audio clip at record 7 playing from its 10th (25 fps) or 24th (24 fps: 1 s) frame, under a shot at
    record 10: the line starts (source start) + 3 timeline frames into the file."""
    resolve, shot_item, _ = scene(version, media_root)
    line = resolve_fake.MediaPoolItem(media_root / "line.wav", {"FPS": audio_fps})
    source_start = 10 if audio_fps == "25" else 24
    audio_item = resolve.timeline.place(line, "audio", 2, 7, 30, source_start)
    shot = script.Shot(resolve.project, shot_item, 1)
    path, offset = script.audio_from_track_item(resolve.project, shot, audio_item)
    assert path == str(media_root / "line.wav")
    assert offset == expected


@pytest.mark.parametrize("version", [18, 21])
def test_source_range_with_a_timeline_at_another_rate(script, media_root, version):
    """A 25 fps clip cut into a 50 fps timeline for 12 timeline frames plays 6 source frames from frame 3."""
    resolve, shot_item, _ = scene(version, media_root, timeline_rate="50")
    shot_item.duration = 12
    shot = script.Shot(resolve.project, shot_item, 1)
    assert (shot.start, shot.end) == (3, 9)
    assert shot.rate == 25 and shot.timeline_rate == 50


def test_without_uimanager_the_console_fallback_uses_the_highest_audio_track(script, media_root, capsys):
    resolve, shot_item, _ = scene(21, media_root)
    line = resolve.import_clip(media_root / "line.wav")
    resolve.timeline.place(line, "audio", 3, 0, 40)
    script.resolve = resolve  # what Resolve hands a menu script
    try:
        host, ui = script._host()  # the fake's Fusion() is None: no UIManager
    finally:
        del script.resolve
    assert host is resolve and isinstance(ui, script.ConsoleUI)
    shot = script.Shot(resolve.project, shot_item, 1)
    tracks = script.audio_tracks_under(resolve.timeline, shot)
    assert [track for track, _, _ in tracks] == [1, 3]
    assert ui.ask(shot, tracks)["audio_track"] == 3
    assert ui.ask(shot, []) is None
    assert "put the replacement audio on an audio track" in capsys.readouterr().out


# -- end to end ---------------------------------------------------------------------------------------------
def test_resolve21_redubs_the_selected_clip_as_a_new_take_and_a_rerun_adds_the_next(script, media_root):
    resolve, shot, decoy = scene(21, media_root)
    ui = run(script, resolve, audio_track=1)
    assert ui.messages and ui.messages[-1].startswith("Added the re-dub as take 2"), ui.messages
    asked_shot, audio_tracks = ui.asked
    assert asked_shot.item is shot and [track for track, _, _ in audio_tracks] == [1]
    assert decoy.GetTakesCount() == 0
    assert shot.GetTakesCount() == 2 and shot.GetSelectedTakeIndex() == 2
    assert not shot.finalized  # the editor keeps flipping between takes
    original, take = shot.GetTakeByIndex(1), shot.GetTakeByIndex(2)
    assert original["mediaPoolItem"] is shot.GetMediaPoolItem()
    result = Path(take["mediaPoolItem"].GetClipProperty("File Path"))
    source = Path(shot.GetMediaPoolItem().GetClipProperty("File Path"))
    assert result.parent == source.parent / "retalk" and result.name == "shot_take2.mp4"
    assert (take["startFrame"], take["endFrame"]) == (0, SHOT["duration"])
    assert media.probe(result).frame_count == SHOT["duration"]
    assert media.probe(result).rate == 25
    start = SHOT["source_start"]
    assert best_matching_source_frames(result, media_root / "shot.mp4") == list(range(start, start + 6))
    assert bin_clips(resolve) == ["shot_take2.mp4"]

    ui = run(script, resolve, audio_track=1)
    assert ui.messages[-1].startswith("Added the re-dub as take 3"), ui.messages
    assert shot.GetTakesCount() == 3 and shot.GetSelectedTakeIndex() == 3
    third = shot.GetTakeByIndex(3)["mediaPoolItem"]
    assert third.GetName() == "shot_take3.mp4"
    assert bin_clips(resolve) == ["shot_take2.mp4", "shot_take3.mp4"]


def test_resolve18_redubs_the_clip_under_the_playhead_with_an_audio_file(script, media_root):
    resolve, shot, decoy = scene(18, media_root)
    assert not hasattr(resolve.timeline, "GetSelectedClips") and not hasattr(shot, "GetSourceStartFrame")
    resolve.timeline.playhead = SHOT["record"] + 2
    ui = run(script, resolve, audio_file=str(media_root / "line.wav"))
    assert ui.messages[-1].startswith("Added the re-dub as take 2"), ui.messages
    assert decoy.GetTakesCount() == 0 and shot.GetSelectedTakeIndex() == 2
    take = shot.GetTakeByIndex(2)
    assert (take["startFrame"], take["endFrame"]) == (0, SHOT["duration"])
    result = Path(take["mediaPoolItem"].GetClipProperty("File Path"))
    start = SHOT["source_start"]
    assert best_matching_source_frames(result, media_root / "shot.mp4") == list(range(start, start + 6))


def test_resolve21_without_a_selection_falls_back_to_the_playhead(script, media_root):
    resolve, shot, decoy = scene(21, media_root, selected=False)
    ui = ScriptedUI(None)  # the editor closes the dialog
    script.main(resolve, ui)
    assert ui.asked[0].item is decoy  # the dialog was offered for the clip under the playhead
    assert ui.messages == []  # closing the dialog is the editor's own choice: nothing to say


class Editor:
    """Drives FusionUI's windows: fills the dialog, watches (or cancels) the progress, reads the message."""

    def __init__(self, choices: dict, cancel_progress: bool = False):
        self.choices = choices
        self.cancel_progress = cancel_progress
        self.progress_texts: list[str] = []
        self.messages: list[str] = []

    def __call__(self, window, dispatcher):
        title = window.props["WindowTitle"]
        items = window.GetItems()
        if title == "Re-dub with retalk":
            for box, value in self.choices.items():
                items[box].CurrentIndex = items[box].entries.index(value)
            if items["Source"].CurrentIndex == 0:
                window.click("Browse")
            window.click("Run")
        elif title == "Re-dubbing with retalk":
            self.progress_texts.append(items["Status"].Text)
            if self.cancel_progress and items["Status"].Text.startswith("Re-dubbing"):
                window.click("Cancel")
            time.sleep(0.05)
        else:
            self.messages.append(next(w.Text for w in window.layout.walk() if w.kind == "Label"))
            window.click("OK")


def fusion_ui(script, editor: Editor, requested_file: str = ""):
    fusion, bmd = resolve_fake.Fusion(requested_file), resolve_fake.Bmd(editor)
    assert script.FusionUI.available(fusion, bmd)
    return script.FusionUI(fusion, bmd)


def test_the_uimanager_dialog_progress_and_message_end_to_end(script, media_root):
    resolve, shot, _ = scene(21, media_root)
    editor = Editor({"Source": "Audio file", "Engine": "preview", "Codec": "h264"})
    script.main(resolve, fusion_ui(script, editor, requested_file=str(media_root / "line.wav")))
    assert editor.messages and editor.messages[0].startswith("Added the re-dub as take 2"), editor.messages
    assert any(text.startswith("Re-dubbing") for text in editor.progress_texts)
    assert shot.GetSelectedTakeIndex() == 2
    take = shot.GetTakeByIndex(2)["mediaPoolItem"]
    assert media.default_extension("h264") != media.default_extension("prores")  # the choice is visible
    assert Path(take.GetClipProperty("File Path")).suffix == media.default_extension("h264")


def test_the_uimanager_progress_cancel_button_cancels_the_job(script, media_root, gate):
    resolve, shot, _ = scene(21, media_root)
    editor = Editor({"Source": "A1 (A1)", "Engine": "preview", "Codec": "h264"}, cancel_progress=True)
    (gate / "open").unlink()  # the job waits at the gate until cancelled
    try:
        script.main(resolve, fusion_ui(script, editor))
    finally:
        (gate / "open").touch()
    assert editor.messages == ["Re-dub cancelled; nothing was added"]
    assert shot.GetTakesCount() == 0


def test_closing_the_uimanager_dialog_does_nothing(script, media_root):
    resolve, shot, _ = scene(21, media_root)

    def close(window, dispatcher):
        window.click("Cancel")

    script.main(resolve, script.FusionUI(resolve_fake.Fusion(), resolve_fake.Bmd(close)))
    assert shot.GetTakesCount() == 0 and bin_clips(resolve) == []


# -- failures reach the editor -------------------------------------------------------------------------------
def test_no_clip_is_a_message(script, media_root):
    resolve, _, _ = scene(18, media_root, selected=False)
    resolve.timeline.playhead = 500
    ui = run(script, resolve, audio_track=1)
    assert ui.asked is None
    assert ui.messages == [
        "No clip to re-dub: select a video clip on the Edit page, or park the playhead on one"
    ]


def test_server_down_is_a_message(tmp_path, media_root, monkeypatch):
    script = install(tmp_path, "tcp://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(script, "CONNECT_TIMEOUT", 2.0)
    resolve, shot, _ = scene(21, media_root)
    ui = run(script, resolve, audio_track=1)
    assert ui.messages == [
        "cannot reach the retalk server at tcp://127.0.0.1:9; start it with `retalk serve`"
    ]
    assert shot.GetTakesCount() == 0 and bin_clips(resolve) == []


@pytest.mark.parametrize("version, placed_on", [(21, "V2"), (18, None)])
def test_a_refused_take_goes_on_the_track_above_or_stays_in_the_bin(script, media_root, version, placed_on):
    resolve, shot, _ = scene(version, media_root)
    resolve.timeline.playhead = SHOT["record"]  # Resolve 18 has no selection reader
    resolve.project.takes_refused = True
    ui = run(script, resolve, audio_track=1)
    assert shot.GetTakesCount() == 0
    [name] = bin_clips(resolve)
    if placed_on:
        assert ui.messages[-1].startswith(f"Resolve refused the take; the re-dub is on {placed_on} above"), (
            ui.messages
        )
        [above] = resolve.timeline.GetItemListInTrack("video", 2)
        assert above.GetName() == name
        assert (above.GetStart(), above.GetDuration()) == (SHOT["record"], SHOT["duration"])
    else:
        first_line = ui.messages[-1].splitlines()[0]  # the pipeline's warnings follow, one a line
        assert first_line == f"Resolve refused the take; the re-dub is in the 'retalk' bin: {name}"
        assert resolve.timeline.GetTrackCount("video") == 1 and len(resolve.timeline.items()) == 2


def test_import_failing_is_a_message_naming_the_file(script, media_root):
    resolve, shot, _ = scene(21, media_root)
    resolve.project.import_fails = True
    ui = run(script, resolve, audio_track=1)
    [text] = ui.messages
    assert text.startswith("Resolve could not import the re-dub; it is at ")
    assert Path(text.rsplit(" ", 1)[1]).is_file()
    assert shot.GetTakesCount() == 0


def test_unsupported_media_is_a_message(script, media_root):
    resolve, shot, _ = scene(21, media_root)
    shot.media = resolve_fake.MediaPoolItem(media_root / "broken.mp4", {"FPS": "25", "Frames": "40"})
    ui = run(script, resolve, audio_track=1)
    [text] = ui.messages
    assert text.startswith("unsupported media: "), text
    assert "\n" not in text


def test_a_failed_job_is_a_message_with_the_servers_reason(script, media_root):
    resolve, shot, _ = scene(21, media_root)
    ui = run(script, resolve, audio_file=str(media_root / "silence.wav"))
    [text] = ui.messages
    assert text.startswith("the re-dub failed: ") and "silent" in text, text
    assert shot.GetTakesCount() == 0


def test_cancel_stops_the_job_and_adds_nothing(script, media_root, gate):
    resolve, shot, _ = scene(21, media_root)
    (gate / "open").unlink()  # the job waits at the gate until cancelled
    try:
        ui = ScriptedUI(dict(TEST_OPTIONS, audio_track=1), cancel=True)
        script.main(resolve, ui)
    finally:
        (gate / "open").touch()
    assert ui.messages == ["Re-dub cancelled; nothing was added"]
    assert "Cancelling..." in ui.statuses
    assert shot.GetTakesCount() == 0 and bin_clips(resolve) == []


# -- only documented Resolve methods -----------------------------------------------------------------------
def readme_methods() -> dict[str, set[str]]:
    """Class -> method names, parsed from the README's API listing."""
    classes: dict[str, set[str]] = {}
    current = None
    for line in README_API.read_text().splitlines():
        if re.fullmatch(r"[A-Z]\w*", line):
            current = classes.setdefault(line, set())
        elif match := re.match(r"  ([A-Z]\w*)\(", line):
            current.add(match.group(1))
    return classes


# Fusion's UIManager, documented in the Fusion scripting guide rather than Resolve's README; the script uses it
# only inside its FusionUI class, and these are the names it may use there.
UI_MANAGER = {
    "UIManager", "UIDispatcher", "AddWindow", "VGroup", "HGroup", "Label", "Button", "LineEdit", "ComboBox",
    "Timer", "GetItems", "AddItem", "Show", "Hide", "RunLoop", "ExitLoop", "Start", "Stop", "RequestFile",
}  # fmt: skip


def called_names(tree: ast.AST, modules: set[str]) -> set[str]:
    """CamelCase method names called on objects (not on the imported ``modules``), plus names probed through
    the script's ``_method(obj, name)``."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr[:1].isupper():
            if getattr(func.value, "id", None) not in modules:
                names.add(func.attr)
        elif getattr(func, "id", None) == "_method":
            names.add(node.args[1].value)
    return names


def test_the_script_calls_only_methods_the_readme_documents():
    documented = set().union(*readme_methods().values())
    tree = ast.parse((PLUGIN / resolve_command.SCRIPT_NAME).read_text())
    fusion_ui = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FusionUI")
    outside = ast.Module(body=[node for node in tree.body if node is not fusion_ui], type_ignores=[])
    modules = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert {"subprocess", "queue"} <= modules
    resolve_calls = called_names(outside, modules)
    assert {
        "AddTake",
        "SelectTakeByIndex",
        "GetSelectedClips",
        "ImportMedia",
    } <= resolve_calls  # the scan works
    assert resolve_calls - documented == set()
    assert called_names(fusion_ui, modules) - documented - UI_MANAGER == set()


def test_the_script_is_python_3_6():
    """Resolve runs scripts under whatever Python 3 it finds, from 3.6 on."""
    source = (PLUGIN / resolve_command.SCRIPT_NAME).read_text()
    ast.parse(source, feature_version=(3, 6))
    with pytest.raises(SyntaxError):  # the check does reject newer syntax
        ast.parse(source + "\nif (n := 1):\n    pass\n", feature_version=(3, 6))
    assert "from __future__ import annotations" not in source  # 3.7+, and ast does not flag it


def test_the_fake_implements_only_readme_methods_of_each_class():
    documented = readme_methods()
    fakes = [
        resolve_fake.Resolve, resolve_fake.ProjectManager, resolve_fake.Project, resolve_fake.MediaPool,
        resolve_fake.Folder, resolve_fake.MediaPoolItem, resolve_fake.Timeline21, resolve_fake.TimelineItem191,
    ]  # fmt: skip
    for fake in fakes:
        readme_class = fake.__name__.rstrip("0123456789")
        methods = {name for name in dir(fake) if name[:1].isupper() and callable(getattr(fake, name))}
        assert methods, fake
        assert methods - documented[readme_class] == set(), readme_class

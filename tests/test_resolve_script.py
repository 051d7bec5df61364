"""The DaVinci Resolve menu entries, installed by `retalk resolve install`, run against the README-built fake
Resolve (tests/resolve_fake.py) and a real `retalk serve` on 127.0.0.1 running the preview engine.

Every end-to-end case runs twice: the Python entry as a module, the Lua entry in LuaJIT (tests/resolve_entries.py).
Each starts the real bridge process (retalk.resolve_bridge), which talks to the real server. There is no display
here, so the bridge takes its console path: the highest audio clip under the shot and the options in its settings
file, progress as console lines (the Tk window is tested in tests/test_resolve_dialog.py). The server's workers
run server_support's gated runner, the real pipeline once its gate is open; a closed gate holds a job so that a
cancel lands mid-job every time.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import resolve_fake
from resolve_entries import LuaEntry, PythonEntry
from resolve_support import CLIP_FRAMES, SHOT, gated_rig
from retalk_protocol.client import Client
from server_support import ServerProcess, started_markers, wait_for

from retalk import media, resolve_bridge
from retalk.cli import main as retalk_main
from retalk.commands import resolve as resolve_command

pytestmark = pytest.mark.resolve

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "davinci"
README_API = PLUGIN / "resolve_api.txt"
ENTRY_CLASSES = {"python": PythonEntry, "lua": LuaEntry}
TEST_OPTIONS = {"engine": "preview", "expression": "neutral", "face": "largest", "codec": "h264"}


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    with gated_rig(tmp_path_factory) as rig:
        yield rig


@pytest.fixture(scope="module")
def media_root(rig):
    return rig.media_root


@pytest.fixture(scope="module")
def gate(rig):
    return rig.gate


@pytest.fixture(scope="module")
def server(rig):
    return rig.server


@pytest.fixture(autouse=True)
def no_display(tmp_path, monkeypatch):
    """No display (the bridge's console path) and a settings file of this test's own."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def install(folder: Path, *args: str) -> None:
    assert retalk_main(["resolve", "install", "--scripts-dir", str(folder), *args]) == 0


def configure(**fields) -> None:
    """Change the bridge's settings file as `retalk resolve install` and the dialog leave it."""
    settings = resolve_bridge.Settings.load()
    for name, value in fields.items():
        setattr(settings, name, value)
    settings.save()


def installed_entry(language: str, server: str, folder: Path, *args: str):
    """Both entries installed by `retalk resolve install` for ``server``, the test options chosen; ``language``'s
    entry loaded as Resolve loads it."""
    install(folder, "--server", server, "--entry", "both", *args)
    configure(options=TEST_OPTIONS)
    return ENTRY_CLASSES[language](folder / "Edit" / resolve_command.PAIR_NAMES[language])


@pytest.fixture(params=["python", "lua"])
def language(request):
    return request.param


@pytest.fixture
def entry(language, server, tmp_path):
    return installed_entry(language, server.endpoint, tmp_path / "Scripts")


def scene(
    version: int, media_root: Path, *, selected: bool = True, timeline_rate: str = "25", edition="studio"
):
    """V1: a decoy clip at 0 and the shot at record 10 (source frames 3..8); A1: the new line under the shot."""
    resolve = resolve_fake.Resolve(version=version, timeline_rate=timeline_rate, edition=edition)
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


def message(lines: list[str], start: str) -> str:
    """The console line the entry printed that starts with "retalk: " + ``start``, without the prefix."""
    found = [line[len("retalk: ") :] for line in lines if line.startswith("retalk: " + start)]
    assert len(found) == 1, lines
    return found[0]


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
def test_install_wires_each_entry_to_this_installation_and_uninstall_removes_them(tmp_path, capsys):
    install(tmp_path, "--server", "tcp://127.0.0.1:9999", "--entry", "both")
    out = capsys.readouterr().out
    edit = tmp_path / "Edit"
    assert sorted(path.name for path in edit.iterdir()) == sorted(resolve_command.PAIR_NAMES.values())
    for name in resolve_command.PAIR_NAMES.values():
        assert f"installed {edit / name}" in out
    python_entry = PythonEntry(edit / resolve_command.PAIR_NAMES["python"])
    assert Path(python_entry.module.RETALK_PYTHON).samefile(sys.executable)
    lua_text = (edit / resolve_command.PAIR_NAMES["lua"]).read_text()
    assert Path(lua_wired_python(lua_text)).samefile(sys.executable)
    settings = resolve_bridge.Settings.load()
    assert (settings.server, settings.keys) == ("tcp://127.0.0.1:9999", None)
    assert f"settings: {resolve_bridge.settings_path()}" in out
    assert f"dofile([[{edit / resolve_command.PAIR_NAMES['lua']}]])" in out  # the Lua console's way in

    assert retalk_main(["resolve", "uninstall", "--scripts-dir", str(tmp_path)]) == 0
    assert list(edit.iterdir()) == []
    assert retalk_main(["resolve", "uninstall", "--scripts-dir", str(tmp_path)]) == 0  # nothing left: says so
    assert "nothing to remove" in capsys.readouterr().out


def lua_wired_python(text: str) -> str:
    """The value an installed Lua entry's RETALK_PYTHON line gives, as LuaJIT reads it."""
    [line] = [line for line in text.splitlines() if line.startswith("local RETALK_PYTHON = ")]
    return LuaEntry.runtime_for_tests().execute(line + "\nreturn RETALK_PYTHON")


def test_the_interpreter_path_is_written_as_a_lua_string():
    template = (PLUGIN / resolve_command.SINGLE_NAMES["lua"]).read_text()
    python = 'C:\\Program Files\\retalk "env"\\python.exe'
    assert lua_wired_python(resolve_command.wired_entry(template, "lua", python)) == python


@pytest.mark.parametrize(
    "seen, expected",
    [
        (None, ("lua", "python")),  # no entry has run yet: both
        ({"entry": "python", "product": "DaVinci Resolve", "version": [21, 1, 0, 0, ""]}, ("lua",)),
        ({"entry": "python", "product": "DaVinci Resolve", "version": [19, 0, 2, 0, ""]}, ("lua",)),
        ({"entry": "python", "product": "DaVinci Resolve Studio", "version": [21, 1, 0, 0, ""]}, ("python",)),
        ({"entry": "lua", "product": "DaVinci Resolve Studio", "version": [18, 6, 0, 0, ""]}, ("lua",)),
    ],
)
def test_install_puts_the_entries_that_fit_the_resolve_an_entry_last_ran_in(tmp_path, capsys, seen, expected):
    configure(resolve=seen)
    install(tmp_path)
    names = resolve_command.SINGLE_NAMES if len(expected) == 1 else resolve_command.PAIR_NAMES
    assert sorted(path.name for path in (tmp_path / "Edit").iterdir()) == sorted(names[e] for e in expected)
    why = [line for line in capsys.readouterr().out.splitlines() if line.startswith("why: ")]
    assert len(why) == 1 and (seen is None or seen["product"] in why[0]), why


def test_installing_other_entries_removes_the_ones_installed_before(tmp_path, capsys):
    install(tmp_path, "--entry", "both")
    install(tmp_path, "--entry", "lua")
    assert [path.name for path in (tmp_path / "Edit").iterdir()] == ["Re-dub with retalk.lua"]
    out = capsys.readouterr().out
    assert all(f"removed {tmp_path / 'Edit' / name}" in out for name in resolve_command.PAIR_NAMES.values())


def test_a_wheel_install_carries_both_entries(tmp_path):
    """`retalk resolve install` from a wheel, away from this checkout, still finds the entries it copies."""
    source = tmp_path / "source"
    shutil.copytree(
        Path(__file__).resolve().parents[1],
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "tests"),
    )
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("retalk-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    code = "import sys, retalk, retalk.cli; print(retalk.__file__); sys.exit(retalk.cli.main(sys.argv[1:]))"
    scripts = tmp_path / "Scripts"
    run = subprocess.run(
        [sys.executable, "-c", code, "resolve", "install", "--scripts-dir", str(scripts), "--entry", "both"],
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(str(tmp_path / "site"))  # the wheel's retalk ran
    installed = (scripts / "Edit" / resolve_command.PAIR_NAMES["python"]).read_text()
    assert f"RETALK_PYTHON = {sys.executable!r}  # written by" in installed
    installed = (scripts / "Edit" / resolve_command.PAIR_NAMES["lua"]).read_text()
    assert lua_wired_python(installed) == sys.executable


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


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--server", "http://x"], "expected tcp://HOST:PORT or ipc://PATH"),
        (["--server", "tcp://192.0.2.7:7878"], "requires CURVE: pass --keys DIR"),
    ],
)
def test_install_refuses_a_server_it_cannot_reach(tmp_path, capsys, args, expected):
    assert retalk_main(["resolve", "install", "--scripts-dir", str(tmp_path), *args]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "Edit").exists()


def test_install_checks_the_keys_folder(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert retalk_main(["keys", str(keys), "--name", "alice"]) == 0
    command = ["resolve", "install", "--scripts-dir", str(tmp_path), "--server", "tcp://192.0.2.7:7878"]
    assert retalk_main([*command, "--keys", str(keys)]) == 1
    assert "no server.key in it" in capsys.readouterr().err
    assert retalk_main(["keys", str(keys), "--name", "server"]) == 0  # server.key and server.key_secret
    assert retalk_main(["keys", str(keys), "--name", "bob"]) == 0
    assert retalk_main([*command, "--keys", str(keys)]) == 1
    assert "expected one client key pair" in capsys.readouterr().err
    (keys / "bob.key_secret").unlink()
    assert retalk_main([*command, "--keys", str(keys)]) == 0
    settings = resolve_bridge.Settings.load()
    assert settings.keys == {"server": str(keys / "server.key"), "client": str(keys / "alice.key_secret")}


@pytest.mark.parametrize("language", ["python", "lua"])
def test_an_entry_not_installed_by_retalk_says_how_to_wire_it(media_root, language):
    template = ENTRY_CLASSES[language](PLUGIN / resolve_command.SINGLE_NAMES[language])
    resolve, _, _ = scene(21, media_root)
    assert template.main(resolve) == [
        "retalk: retalk is not wired to this script: run `retalk resolve install` in retalk's environment"
    ]


def test_the_lua_entry_run_whole_uses_the_resolve_it_is_given(media_root, server, tmp_path):
    """As the menu runs it, or `dofile` in Resolve's Lua console: no module argument, `resolve` a global."""
    entry = installed_entry("lua", server.endpoint, tmp_path)
    resolve, _, _ = scene(21, media_root, selected=False)
    resolve.timeline.playhead = 500
    assert entry.run_as_script(resolve) == [
        "retalk: No clip to re-dub: select a video clip on the Edit page, or park the playhead on one"
    ]


# -- what the entries read in Resolve -------------------------------------------------------------------------
@pytest.mark.parametrize("version", [18, 21])
@pytest.mark.parametrize("audio_fps, expected", [("25", Fraction(10 + 3, 25)), ("24", 1 + Fraction(3, 25))])
def test_audio_from_a_track_starts_where_the_shot_does(entry, media_root, version, audio_fps, expected):
    """An audio clip at record 7 playing from its 10th (25 fps) or 24th (24 fps: 1 s) frame, under a shot at
    record 10: the line starts (source start) + 3 timeline frames into the file."""
    resolve, _, _ = scene(version, media_root)
    resolve.timeline.playhead = SHOT["record"]  # Resolve 18 has no selection reader
    line = resolve_fake.MediaPoolItem(media_root / "line.wav", {"FPS": audio_fps})
    resolve.timeline.place(line, "audio", 2, 7, 30, 10 if audio_fps == "25" else 24)
    request = entry.read_shot(resolve)
    shot = resolve_bridge.Shot.from_facts(request["shot"])
    clips = [resolve_bridge.AudioClip.from_facts(facts, shot) for facts in request["audio"]]
    assert [(clip.track, clip.track_name, clip.path) for clip in clips] == [
        (1, "A1", str(media_root / "line.wav")),
        (2, "A2", str(media_root / "line.wav")),
    ]
    assert clips[0].offset == 0 and clips[1].offset == expected


@pytest.mark.parametrize("version", [18, 21])
def test_source_range_with_a_timeline_at_another_rate(entry, media_root, version):
    """A 25 fps clip cut into a 50 fps timeline for 12 timeline frames plays 6 source frames from frame 3."""
    resolve, shot_item, _ = scene(version, media_root, timeline_rate="50")
    resolve.timeline.playhead = SHOT["record"]
    shot_item.duration = 12
    request = entry.read_shot(resolve)
    assert ("source_start" in request["shot"] and request["shot"]["source_start"] is not None) == (
        version == 21
    )
    shot = resolve_bridge.Shot.from_facts(request["shot"])
    assert (shot.start, shot.end) == (3, 9)
    assert shot.rate == 25 and shot.timeline_rate == 50


def test_without_a_selection_the_clip_under_the_playhead_is_read(entry, media_root):
    resolve, shot, decoy = scene(21, media_root, selected=False)
    request = entry.read_shot(resolve)
    assert (
        request["shot"]["record_start"] == 0 and request["audio"] == []
    )  # the decoy, with no audio under it
    resolve.timeline.playhead = SHOT["record"] + 2
    assert entry.read_shot(resolve)["shot"]["record_start"] == SHOT["record"]
    assert request["host"] == {
        "entry": entry.language,
        "product": "DaVinci Resolve Studio",
        "version": [21, 0, 0, 0, ""],
    }


# -- end to end ---------------------------------------------------------------------------------------------
def test_resolve21_redubs_the_selected_clip_as_a_new_take_and_a_rerun_adds_the_next(entry, media_root):
    resolve, shot, decoy = scene(21, media_root)
    lines = entry.main(resolve)
    assert message(lines, "Added the re-dub as take ") == "Added the re-dub as take 2 of 'shot.mp4'."
    notice = message(lines, "retalk cannot open its window here")
    assert "(no display: DISPLAY is not set)" in notice and "A1: line.wav" in notice
    assert any(line.startswith("retalk: Re-dubbing: ") for line in lines), lines  # progress, in the console
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

    lines = entry.main(resolve)
    assert message(lines, "Added the re-dub as take ") == "Added the re-dub as take 3 of 'shot.mp4'."
    assert shot.GetTakesCount() == 3 and shot.GetSelectedTakeIndex() == 3
    third = shot.GetTakeByIndex(3)["mediaPoolItem"]
    assert third.GetName() == "shot_take3.mp4"
    assert bin_clips(resolve) == ["shot_take2.mp4", "shot_take3.mp4"]


def test_resolve18_redubs_the_clip_under_the_playhead(entry, media_root):
    resolve, shot, decoy = scene(18, media_root, edition="free")
    assert not hasattr(resolve.timeline, "GetSelectedClips") and not hasattr(shot, "GetSourceStartFrame")
    resolve.timeline.playhead = SHOT["record"] + 2
    lines = entry.main(resolve)
    assert message(lines, "Added the re-dub as take ") == "Added the re-dub as take 2 of 'shot.mp4'."
    assert decoy.GetTakesCount() == 0 and shot.GetSelectedTakeIndex() == 2
    take = shot.GetTakeByIndex(2)
    assert (take["startFrame"], take["endFrame"]) == (0, SHOT["duration"])
    result = Path(take["mediaPoolItem"].GetClipProperty("File Path"))
    start = SHOT["source_start"]
    assert best_matching_source_frames(result, media_root / "shot.mp4") == list(range(start, start + 6))
    # the bridge noted where it ran: the next `retalk resolve install` puts the Lua entry (free edition)
    seen = resolve_bridge.Settings.load().resolve
    assert seen == {"entry": entry.language, "product": "DaVinci Resolve", "version": [18, 0, 0, 0, ""]}


# -- failures reach the editor -------------------------------------------------------------------------------
def test_no_clip_is_a_message(entry, media_root):
    resolve, _, _ = scene(18, media_root, selected=False)
    resolve.timeline.playhead = 500
    assert entry.main(resolve) == [
        "retalk: No clip to re-dub: select a video clip on the Edit page, or park the playhead on one"
    ]


def test_several_selected_clips_are_a_message(entry, media_root):
    resolve, shot, decoy = scene(21, media_root)
    resolve.timeline.selection = [decoy, shot]
    assert entry.main(resolve) == ["retalk: 2 video clips are selected; select just the one to re-dub"]


def test_no_audio_under_the_shot_without_a_window_says_what_to_do(entry, media_root):
    resolve, shot, _ = scene(21, media_root)
    resolve.timeline.tracks["audio"] = [[]]
    [line] = entry.main(resolve)
    assert line == (
        "retalk: retalk cannot open its window here (no display: DISPLAY is not set), so no audio file can be "
        "chosen: put the replacement audio on an audio track under the shot's first frame and run the script again"
    )
    assert shot.GetTakesCount() == 0


def test_server_down_is_a_message(language, media_root, tmp_path):
    entry = installed_entry(language, "tcp://127.0.0.1:9", tmp_path)  # nothing listens on the discard port
    configure(connect_timeout=2.0)
    resolve, shot, _ = scene(21, media_root)
    lines = entry.main(resolve)
    assert (
        lines[-1]
        == "retalk: cannot reach the retalk server at tcp://127.0.0.1:9; start it with `retalk serve`"
    )
    assert shot.GetTakesCount() == 0 and bin_clips(resolve) == []


@pytest.mark.parametrize("version, placed_on", [(21, "V2"), (18, None)])
def test_a_refused_take_goes_on_the_track_above_or_stays_in_the_bin(entry, media_root, version, placed_on):
    resolve, shot, _ = scene(version, media_root)
    resolve.timeline.playhead = SHOT["record"]  # Resolve 18 has no selection reader
    resolve.project.takes_refused = True
    lines = entry.main(resolve)
    assert shot.GetTakesCount() == 0
    [name] = bin_clips(resolve)
    if placed_on:
        text = message(lines, "Resolve refused the take")
        assert (
            text
            == f"Resolve refused the take; the re-dub is on {placed_on} above 'shot.mp4' at the same frame."
        )
        [above] = resolve.timeline.GetItemListInTrack("video", 2)
        assert above.GetName() == name
        assert (above.GetStart(), above.GetDuration()) == (SHOT["record"], SHOT["duration"])
    else:
        text = message(lines, "Resolve refused the take")
        assert text == f"Resolve refused the take; the re-dub is in the 'retalk' bin: {name}"
        assert resolve.timeline.GetTrackCount("video") == 1 and len(resolve.timeline.items()) == 2


def test_import_failing_is_a_message_naming_the_file(entry, media_root):
    resolve, shot, _ = scene(21, media_root)
    resolve.project.import_fails = True
    text = message(entry.main(resolve), "Resolve could not import the re-dub")
    assert text.startswith("Resolve could not import the re-dub; it is at ")
    assert Path(text.rsplit(" ", 1)[1]).is_file()
    assert shot.GetTakesCount() == 0


def test_unsupported_media_is_a_message(entry, media_root):
    resolve, shot, _ = scene(21, media_root)
    shot.media = resolve_fake.MediaPoolItem(media_root / "broken.mp4", {"FPS": "25", "Frames": "40"})
    text = message(entry.main(resolve), "unsupported media: ")
    assert "\n" not in text
    assert shot.GetTakesCount() == 0


def test_a_failed_job_is_a_message_with_the_servers_reason(entry, media_root):
    resolve, shot, _ = scene(21, media_root)
    silence = resolve.import_clip(media_root / "silence.wav")
    resolve.timeline.place(silence, "audio", 2, SHOT["record"], 40)  # the highest track is the one used
    text = message(entry.main(resolve), "the re-dub failed: ")
    assert "silent" in text, text
    assert shot.GetTakesCount() == 0


def test_a_job_cancelled_elsewhere_adds_nothing(entry, media_root, server, gate):
    """`retalk cancel` from another machine while the job waits: the entry says so and places nothing."""
    resolve, shot, _ = scene(21, media_root)
    before = len(started_markers(gate))

    def cancel_when_started():
        wait_for(lambda: len(started_markers(gate)) > before, 120, "the job to reach the gate")
        with Client(server.endpoint, name="test-canceller") as client:
            [job] = client.list_jobs(states=["running"])
            client.cancel(job["job"])

    (gate / "open").unlink()  # the job waits at the gate until cancelled
    canceller = threading.Thread(target=cancel_when_started)
    canceller.start()
    try:
        lines = entry.main(resolve)
    finally:
        (gate / "open").touch()
        canceller.join()
    assert lines[-1] == "retalk: Re-dub cancelled; nothing was added"
    assert shot.GetTakesCount() == 0 and bin_clips(resolve) == []


def test_the_bridge_cancels_the_job_when_its_entry_goes_away(server, media_root, gate, tmp_path):
    """Resolve quits mid-job: the bridge's next line (a status, or its keep-alive) finds nobody reading."""
    entry = installed_entry("python", server.endpoint, tmp_path / "Scripts")
    resolve, shot, _ = scene(21, media_root)
    request = tmp_path / "request.json"
    request.write_text(json.dumps(entry.read_shot(resolve)))
    (gate / "open").unlink()  # the job waits at the gate until cancelled
    try:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "retalk.resolve_bridge", str(request)], stdout=subprocess.PIPE, text=True
        )
        for line in bridge.stdout:
            if match := re.search(r"as job (\S+)", json.loads(line).get("text", "")):
                break
        bridge.stdout.close()  # the entry is gone
        assert bridge.wait(timeout=60) == 0
    finally:
        (gate / "open").touch()
    with Client(server.endpoint, name="test-watcher") as client:
        assert client.watch(match.group(1))["state"] == "cancelled"
    assert not (Path(json.loads(request.read_text())["shot"]["path"]).parent / "retalk").exists()


# -- a server on another machine: CURVE ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curve_server(tmp_path_factory, media_root):
    """A CURVE server on loopback admitting alice's key (not mallory's); its media root is not the clips' folder,
    so the bridge uploads them, as it would to another machine."""
    keys = tmp_path_factory.mktemp("server-keys")
    allowed = tmp_path_factory.mktemp("allowed")
    alice, mallory = tmp_path_factory.mktemp("alice"), tmp_path_factory.mktemp("mallory")
    for folder, name in ((keys, "server"), (alice, "alice"), (mallory, "mallory")):
        assert retalk_main(["keys", str(folder), "--name", name]) == 0
    for folder in (alice, mallory):
        shutil.copy(keys / "server.key", folder)
    shutil.copy(alice / "alice.key", allowed)
    process = ServerProcess(
        tmp_path_factory.mktemp("curve-state") / "state",
        tmp_path_factory.mktemp("curve-media"),
        "--workers",
        "1",
        "--server-key",
        str(keys / "server.key_secret"),
        "--allow",
        str(allowed),
    )
    yield process, alice, mallory
    process.stop()


def test_a_curve_server_redubs_with_the_installed_keys(language, media_root, tmp_path, curve_server):
    server, alice, _ = curve_server
    entry = installed_entry(language, server.endpoint, tmp_path, "--keys", str(alice))
    resolve, shot, _ = scene(21, media_root)
    lines = entry.main(resolve)
    assert message(lines, "Added the re-dub as take ") == "Added the re-dub as take 2 of 'shot.mp4'."
    result = Path(shot.GetTakeByIndex(2)["mediaPoolItem"].GetClipProperty("File Path"))
    assert media.probe(result).frame_count == SHOT["duration"]


def test_a_key_the_server_does_not_allow_is_a_message(language, media_root, tmp_path, curve_server):
    server, _, mallory = curve_server
    entry = installed_entry(language, server.endpoint, tmp_path, "--keys", str(mallory))
    configure(connect_timeout=2.0)
    resolve, shot, _ = scene(21, media_root)
    assert entry.main(resolve)[-1] == (
        f"retalk: cannot reach the retalk server at {server.endpoint}: is `retalk serve` running there, "
        "and is mallory.key in its --allow folder?"
    )
    assert shot.GetTakesCount() == 0


# -- the entries' code ---------------------------------------------------------------------------------------
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


def python_entry_calls() -> set[str]:
    """CamelCase method names the Python entry calls on objects (not on its imported modules), plus the names
    it probes through ``_probe(obj, name)``."""
    tree = ast.parse((PLUGIN / resolve_command.SINGLE_NAMES["python"]).read_text())
    modules = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert {"subprocess", "json"} <= modules
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr[:1].isupper():
            if getattr(func.value, "id", None) not in modules:
                names.add(func.attr)
        elif getattr(func, "id", None) == "_probe":
            names.add(node.args[1].value)
    return names


def lua_source_without_comments() -> str:
    source = (PLUGIN / resolve_command.SINGLE_NAMES["lua"]).read_text()
    source = re.sub(r"--\[\[.*?\]\]", "", source, flags=re.S)
    return re.sub(r"--[^\n]*", "", source)


def lua_entry_calls() -> set[str]:
    """CamelCase method names the Lua entry calls (``obj:Name(``), plus the names it probes (``probe(obj, "Name")``)."""
    source = lua_source_without_comments()
    return set(re.findall(r":([A-Z]\w*)\s*\(", source)) | set(
        re.findall(r'probe\(\w+,\s*"([A-Z]\w*)"\)', source)
    )


def test_the_entries_call_only_methods_the_readme_documents_and_the_same_ones():
    documented = set().union(*readme_methods().values())
    python_calls, lua_calls = python_entry_calls(), lua_entry_calls()
    scanned = {"AddTake", "SelectTakeByIndex", "GetSelectedClips", "GetSourceStartFrame", "ImportMedia"}
    assert scanned <= python_calls and scanned <= lua_calls  # the scans work
    assert python_calls - documented == set()
    assert lua_calls - documented == set()
    assert python_calls == lua_calls  # the two entries differ in language only


def report_codes(source: str, patterns: list[str]) -> set[str]:
    return {code for pattern in patterns for code in re.findall(pattern, source)}


def test_every_outcome_the_entries_report_is_one_the_bridge_words():
    python = (PLUGIN / resolve_command.SINGLE_NAMES["python"]).read_text()
    lua = lua_source_without_comments()
    python_codes = report_codes(python, [r'Failure\("([a-z-]+)"', r'"code": "([a-z-]+)"'])
    lua_codes = report_codes(lua, [r'failure\("([a-z-]+)"', r'code = "([a-z-]+)"'])
    assert len(python_codes) >= 10 and python_codes == lua_codes
    assert python_codes == set(resolve_bridge.REPORTS)


def test_the_python_entry_is_python_3_6():
    """Resolve runs scripts under whatever Python 3 it finds, from 3.6 on."""
    source = (PLUGIN / resolve_command.SINGLE_NAMES["python"]).read_text()
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

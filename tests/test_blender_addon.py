"""The Blender VSE add-on in real Blender (bpy wheels, one venv each: tools/blender_venvs.sh) against a real
`retalk serve` on 127.0.0.1 running the preview engine.

Each bpy version runs tests/blender/drive_redub.py once: it installs the built extension zip (with its bundled
wheels) the way Blender installs extensions, builds a scene (a trimmed movie strip, a sound strip, a strip in
the way on the channel above), runs the operator in several scenarios (server unreachable, remote server
refused, wrong scene rate, sound starting late, two re-dubs, a cancel mid-job) and reports what happened; the
tests below check that report against the server and the files. A run of the newest bpy covers the preferences
(CURVE keys, the button that starts a local server).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from mediagen import write_face_clip, write_tone
from retalk_protocol import options as job_options
from retalk_protocol.client import Client, frame_array
from server_support import GATE_ENV, GATED_RUNNER, ServerProcess

from retalk import media
from retalk.cli import main as retalk_main

pytestmark = pytest.mark.blender

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "plugins" / "blender_vse"
DRIVER = Path(__file__).resolve().parent / "blender" / "drive_redub.py"
# bpy version -> its venv (made by tools/blender_venvs.sh; keep the two lists in sync)
BPY_VERSIONS = ("4.2.23", "5.0.1", "5.2.3")
BPY_CACHE = Path(os.environ.get("RETALK_BPY_CACHE", Path.home() / ".cache" / "retalk-test"))
CLIP_FRAMES = 20
# The movie strip: content at frame 10, 2 source frames hard-trimmed, handles trimming 3 and 2 more frames.
LAYOUT = {"fps": 25, "movie_at": 10, "hard_trim": 2, "trim_left": 3, "trim_right": 2, "sound_at": 6}
ORIGINAL_CHANNEL, OBSTACLE_CHANNEL = 2, 3
LATE_SOUND = 10  # frames the sound strip is moved by: it then starts after the movie's first shown frame
UNREACHABLE_TIMEOUT = 3.0
# TEST-NET-1: never reached, the add-on must refuse before connecting
REMOTE_ENDPOINT = "tcp://192.0.2.1:7878"


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> Path:
    """The extension as tools/build_blender_extension.py builds it (this platform, both Blender Pythons)."""
    output = tmp_path_factory.mktemp("extension")
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_blender_extension.py"), "-o", str(output)]
        + ["--platform", "linux-x64"],
        check=True,
        capture_output=True,
    )
    return next(output.glob("*.zip"))


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_face_clip(root / "clip.mp4", n_frames=CLIP_FRAMES, size=(160, 160), with_audio=False)
    write_tone(root / "line.wav", 2.0)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root):
    process = ServerProcess(tmp_path_factory.mktemp("state") / "state", media_root, "--workers", "1")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gated_server(tmp_path_factory, media_root):
    """A server whose jobs wait at a gate that never opens: they stay running until cancelled."""
    gate = tmp_path_factory.mktemp("gate")
    state = tmp_path_factory.mktemp("gated") / "state"
    args = ("--workers", "1", "--runner", GATED_RUNNER)
    process = ServerProcess(state, media_root, *args, env={GATE_ENV: str(gate)})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory) -> Path:
    """`retalk keys` pairs for a server and two clients; only "editor" is on the server's allow-list."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", "editor", "stranger"):
        assert retalk_main(["keys", str(folder), "--name", name]) == 0
    (folder / "allowed").mkdir()
    shutil.copy(folder / "editor.key", folder / "allowed")
    return folder


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory, media_root, curve_keys):
    state = tmp_path_factory.mktemp("curve") / "state"
    args = ("--workers", "1", "--server-key", str(curve_keys / "server.key_secret"))
    process = ServerProcess(state, media_root, *args, "--allow", str(curve_keys / "allowed"))
    yield process
    process.stop()


def _stop_local_servers(pids_file: Path) -> None:
    """Stop the servers the add-on started (they outlive Blender by design; not our children)."""
    if not pids_file.exists():
        return
    for pid in json.loads(pids_file.read_text()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for pid in json.loads(pids_file.read_text()):
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _unused_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _run_driver(version: str, work: Path, extension_zip: Path, media_root: Path, scenarios: list) -> dict:
    """Run tests/blender/drive_redub.py in the bpy ``version`` venv; returns its report."""
    python = BPY_CACHE / f"bpy-{version}" / "bin" / "python"
    if not python.exists():
        # tools/blender_venvs.sh leaves this where it found no Python for the release
        unavailable = BPY_CACHE / f"bpy-{version}.unavailable"
        if unavailable.exists():
            pytest.skip(unavailable.read_text().strip())
        pytest.fail(
            f"no bpy {version} venv at {python.parent.parent}: run tools/test.sh (or tools/blender_venvs.sh)"
        )
    project = work / "project"
    project.mkdir()
    config = {
        "zip": str(extension_zip),
        "video": str(media_root / "clip.mp4"),
        "audio": str(media_root / "line.wav"),
        "blend": str(project / "edit.blend"),
        "report": str(work / "report.json"),
        "pids": str(work / "local-servers.json"),
        "layout": LAYOUT,
        "scenarios": scenarios,
    }
    (work / "config.json").write_text(json.dumps(config))
    environment = dict(
        os.environ,
        BLENDER_USER_RESOURCES=str(work / "blender-user"),  # extensions and preferences for this run only
        XDG_STATE_HOME=str(work / "state"),  # a server the add-on starts keeps its journal here
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # its `retalk`
    )
    try:
        run = subprocess.run(
            [str(python), str(DRIVER), str(work / "config.json")],
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop_local_servers(work / "local-servers.json")
    assert run.returncode == 0, f"bpy {version} driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads((work / "report.json").read_text())
    assert report["version"][:2] == [int(part) for part in version.split(".")[:2]]
    return dict(report, project=project)


@pytest.fixture(scope="module", params=BPY_VERSIONS)
def blender(request, tmp_path_factory, extension_zip, media_root, server, gated_server) -> dict:
    """Each bpy version: server unreachable, remote refused, wrong scene rate, two re-dubs, a cancel."""
    scenarios = [
        {"name": "unreachable", "endpoint": _unused_endpoint(), "timeout": UNREACHABLE_TIMEOUT},
        {"name": "remote", "endpoint": REMOTE_ENDPOINT, "timeout": 30.0},
        {
            "name": "rate_mismatch",
            "endpoint": server.endpoint,
            "timeout": 30.0,
            "scene_fps": 2 * LAYOUT["fps"],
        },
        {"name": "late_sound", "endpoint": server.endpoint, "timeout": 30.0, "shift_sound": LATE_SOUND},
        {"name": "redub", "endpoint": server.endpoint, "timeout": 30.0},
        {"name": "redub_again", "endpoint": server.endpoint, "timeout": 30.0},
        {"name": "cancel", "endpoint": gated_server.endpoint, "timeout": 30.0, "cancel_when_running": True},
    ]
    work = tmp_path_factory.mktemp(f"bpy-{request.param}")
    return _run_driver(request.param, work, extension_zip, media_root, scenarios)


@pytest.fixture(scope="module")
def blender_preferences(tmp_path_factory, extension_zip, media_root, curve_server, curve_keys) -> dict:
    """The newest bpy only (this is version-independent code): CURVE keys and the local-server button."""

    def curve(name: str, client: str, timeout: float) -> dict:
        key_files = {
            "server_key_file": str(curve_keys / "server.key"),
            "client_key_file": str(curve_keys / client),
        }
        return {"name": name, "endpoint": curve_server.endpoint, "timeout": timeout, **key_files}

    scenarios = [
        curve("curve", "editor.key_secret", 30.0),
        curve("curve_stranger", "stranger.key_secret", UNREACHABLE_TIMEOUT),
        # Started by the preferences' button, with the .blend's folder as its only media root: the clip and
        # audio lie elsewhere, so the add-on uploads them.
        {"name": "local", "endpoint": _unused_endpoint(), "timeout": 120.0, "start_local_server": True},
    ]
    work = tmp_path_factory.mktemp("bpy-preferences")
    return _run_driver(BPY_VERSIONS[-1], work, extension_zip, media_root, scenarios)


def _load_addon_options():
    spec = importlib.util.spec_from_file_location("blender_vse_options", ADDON / "options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frames(path: Path) -> np.ndarray:
    """Every frame of a (small) clip, (n, H, W, 3) uint8 RGB."""
    return np.concatenate([chunk.frames for chunk in media.iter_frames(path, 0, None, chunk_size=8)])


# -- the extension package -----------------------------------------------------------------------------------
def test_addon_submits_the_table_s_options_and_knows_which_engine_ignores_which():
    options = _load_addon_options()
    assert [option.name for option in options.FIELDS] == ["engine", *job_options.JOB_OPTIONS]
    face, seed = job_options.JOB_OPTIONS["face"], job_options.JOB_OPTIONS["seed"]
    assert options.submitted_value(face, "  ") == "largest" and options.submitted_value(face, " 1 ") == "1"
    assert options.submitted_value(seed, 3) == 3
    upper_face = job_options.JOB_OPTIONS["upper_face"]
    assert not options.honoured(upper_face, "preview")
    assert options.honoured(upper_face, "neural") and options.honoured(upper_face, "auto")


def test_extension_zip_lists_its_bundled_wheels_and_carries_no_protocol_source(extension_zip):
    with zipfile.ZipFile(extension_zip) as archive:
        names = set(archive.namelist())
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
    wheels = [path.removeprefix("./") for path in manifest["wheels"]]
    assert wheels and all(path in names for path in wheels)
    assert {Path(path).name.split("-")[0] for path in wheels} == {"retalk_protocol", "pyzmq", "msgpack"}
    assert manifest["platforms"] == ["linux-x64"]
    assert "network" in manifest["permissions"]
    assert not [name for name in names if name.endswith(".py") and "retalk_protocol" in name]
    assert not list(ADDON.rglob("codec.py")) and not list(ADDON.rglob("*.whl"))


# -- in Blender ----------------------------------------------------------------------------------------------
def test_unreachable_server_is_a_one_line_report_and_blender_keeps_running(blender):
    outcome = blender["scenarios"]["unreachable"]
    assert outcome["operator"] == ["FINISHED"] and outcome["finished"]
    assert outcome["state"] == "failed" and outcome["new"] == []
    assert "retalk serve" in outcome["message"] and "\n" not in outcome["message"]
    # The operator polled all along instead of waiting for the connection timeout in one call.
    assert outcome["ticks"] > 3
    assert outcome["slowest_tick"] < UNREACHABLE_TIMEOUT / 3


def test_redub_sends_the_frames_shown_and_the_aligned_audio(blender):
    outcome = blender["scenarios"]["redub"]
    assert outcome["state"] == "done", outcome["message"]
    assert outcome["start"] == LAYOUT["hard_trim"] + LAYOUT["trim_left"]
    assert outcome["end"] == CLIP_FRAMES - LAYOUT["trim_right"]
    assert Fraction(*outcome["rate"]) == LAYOUT["fps"]
    shown_at = outcome["original"]["start"]
    assert Fraction(*outcome["audio_offset"]) == Fraction(shown_at - LAYOUT["sound_at"], LAYOUT["fps"])
    assert outcome["audio_source"] == ("STRIP" if blender["audaspace"] else "FILE")


def test_redub_puts_a_numbered_take_on_the_first_free_channel_above_at_the_same_place(blender):
    outcome = blender["scenarios"]["redub"]
    original = outcome["original"]
    assert original["channel"] == ORIGINAL_CHANNEL
    movies = [strip for strip in outcome["new"] if strip["type"] == "MOVIE"]
    sounds = [strip for strip in outcome["new"] if strip["type"] == "SOUND"]
    assert len(movies) == 1
    take = movies[0]
    assert take["name"] == f"{original['name']} take 1"
    assert take["channel"] == OBSTACLE_CHANNEL + 1
    assert (take["start"], take["end"]) == (original["start"], original["end"])
    result = Path(take["filepath"])
    assert result.parent == blender["project"] / "retalk" and result.is_file()
    assert result.suffix == ".mkv"  # the lossless codec asked for
    if blender["audaspace"]:  # the new audio beside it (the bpy 4.2 wheel has no sound support)
        assert len(sounds) == 1
        assert sounds[0]["channel"] == take["channel"] + 1
        assert (sounds[0]["start"], sounds[0]["end"]) == (take["start"], take["end"])
        assert Path(sounds[0]["filepath"]) == result
    else:
        assert sounds == []


def test_take_frames_match_the_servers_output_for_the_same_range(blender, server, media_root):
    outcome = blender["scenarios"]["redub"]
    take = next(strip for strip in outcome["new"] if strip["type"] == "MOVIE")
    length = take["end"] - take["start"]
    with Client(server.endpoint, name="pytest-blender", timeout=60) as client:
        rendered = {}
        for message in client.render(outcome["job"], 0, length - 1, audio=False):
            if message.type == "FRAME":
                rendered[message["index"]] = np.array(frame_array(message))
    assert sorted(rendered) == list(range(length))
    fetched = _frames(Path(take["filepath"]))
    assert len(fetched) == length
    np.testing.assert_array_equal(fetched[0], rendered[0])
    np.testing.assert_array_equal(fetched[-1], rendered[length - 1])
    # The take starts on the source frame the trimmed strip showed first (not the file's first frame).
    distances = [
        np.abs(fetched[0].astype(int) - frame.astype(int)).mean()
        for frame in _frames(media_root / "clip.mp4")
    ]
    assert int(np.argmin(distances)) == LAYOUT["hard_trim"] + LAYOUT["trim_left"]


def test_the_status_bar_follows_the_job(blender):
    # The gated job reports stage "gate", 0 of 1 done, then waits until the add-on cancels it.
    lines = blender["scenarios"]["cancel"]["status_lines"]
    assert any(re.fullmatch(r"retalk: gate 0/1(, \d+ s left)? \(Esc cancels\)", line) for line in lines), (
        lines
    )
    assert lines.index("retalk: cancelling…") > 0 and lines[-1] == "retalk: cancelled"


def test_cancel_mid_job_cancels_it_on_the_server_and_adds_nothing(blender, gated_server):
    outcome = blender["scenarios"]["cancel"]
    assert outcome["finished"] and outcome["state"] == "cancelled", outcome["message"]
    assert outcome["job"] and outcome["new"] == [] and outcome["output"] is None
    with Client(gated_server.endpoint, name="pytest-blender", timeout=30) as client:
        assert client.watch(outcome["job"])["state"] == "cancelled"


_BPY_TYPES = {bool: "BOOLEAN", int: "INT"}


def test_the_operator_s_fields_are_the_option_table(blender):
    fields = blender["fields"]
    for option in (job_options.ENGINE, *job_options.JOB_OPTIONS.values()):
        field = fields[option.name]
        kind = _BPY_TYPES.get(option.type, "ENUM" if option.choices else "STRING")
        assert (field["type"], field["default"], field["description"]) == (kind, option.default, option.help)
        assert field["items"] == list(option.choices if kind == "ENUM" else [])
    own = {"audio_source", "audio_file", "audio_offset"}
    assert set(fields) == own | {"engine", *job_options.JOB_OPTIONS}


def test_operator_is_in_both_menus_and_needs_a_selected_movie_strip(blender):
    assert blender["menus"] == {"SEQUENCER_MT_context_menu": True, "SEQUENCER_MT_strip": True}
    assert blender["scenarios"]["redub"]["poll"] is True
    assert blender["poll_without_selection"] is False


def test_a_remote_server_is_refused_while_blenders_online_access_is_off(blender):
    assert blender["online_access"] is False  # a fresh Blender user folder: online access not granted
    outcome = blender["scenarios"]["remote"]
    assert outcome["operator"] == ["CANCELLED"] and outcome["new"] == []
    assert (
        f"{REMOTE_ENDPOINT} is not on this machine and Blender's online access is off" in outcome["message"]
    )


def test_a_second_redub_is_take_2_above_the_first(blender):
    first = blender["scenarios"]["redub"]
    again = blender["scenarios"]["redub_again"]
    assert again["state"] == "done", again["message"]
    take = next(strip for strip in again["new"] if strip["type"] == "MOVIE")
    assert take["name"] == f"{first['original']['name']} take 2"
    assert Path(take["filepath"]).name == "shot_take2.mkv" and Path(take["filepath"]).is_file()
    assert take["channel"] == max(strip["channel"] for strip in first["new"]) + 1
    assert (take["start"], take["end"]) == (first["original"]["start"], first["original"]["end"])


def test_curve_keys_from_the_preferences_admit_a_listed_client_only(blender_preferences):
    admitted = blender_preferences["scenarios"]["curve"]
    assert admitted["state"] == "done", admitted["message"]
    assert [strip["name"] for strip in admitted["new"] if strip["type"] == "MOVIE"] == ["shot take 1"]
    refused = blender_preferences["scenarios"]["curve_stranger"]
    assert refused["state"] == "failed" and refused["new"] == [] and refused["job"] is None
    assert "is `retalk serve` running there" in refused["message"]


def test_the_preferences_button_starts_a_local_server_and_media_outside_its_root_are_uploaded(
    blender_preferences,
):
    outcome = blender_preferences["scenarios"]["local"]
    assert outcome["state"] == "done", outcome["message"]
    assert outcome["media_sent"] == "upload"
    assert (
        blender_preferences["scenarios"]["curve"]["media_sent"] == "path"
    )  # inside that server's media root
    takes = [strip for strip in outcome["new"] if strip["type"] == "MOVIE"]
    assert [strip["name"] for strip in takes] == ["shot take 2"] and Path(takes[0]["filepath"]).is_file()


def test_a_sound_strip_starting_after_the_movie_is_refused_with_the_fix(blender):
    outcome = blender["scenarios"]["late_sound"]
    assert outcome["ran"] is blender["audaspace"]  # the bpy 4.2 wheel has no sound strips to move
    if outcome["ran"]:
        late = LAYOUT["sound_at"] + LATE_SOUND - blender["scenarios"]["redub"]["original"]["start"]
        assert outcome["operator"] == ["CANCELLED"] and outcome["new"] == []
        assert f"sound strip 'line' starts {late} frames after movie strip 'shot'" in outcome["message"]

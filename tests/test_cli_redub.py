"""The ``retalk`` command line: ``redub`` and ``demo`` with JSON progress and result, exit statuses (no face: 3),
one-line errors, the output checked before any work, and a ``--help`` that imports no command module."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
from mediagen import write_face_clip, write_tone

from retalk import media
from retalk.cli import main
from retalk.commands import COMMANDS


def test_redub_json_end_to_end(tmp_path, capsys):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=8, size=(320, 240))
    audio = write_tone(tmp_path / "line.wav", 0.5)
    out = tmp_path / "redub.mkv"
    argv = ["redub", "--video", str(video), "--audio", str(audio), "-o", str(out), "--engine", "preview"]
    argv += [
        "--codec",
        "lossless",
        "--fit",
        "audio",
        "--extend",
        "pingpong",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main([*argv, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress, result = lines[:-1], lines[-1]
    assert {e["event"] for e in progress} == {"progress"}
    assert {"check", "track", "render", "encode"} <= {e["stage"] for e in progress}
    render = [e for e in progress if e["stage"] == "render"]
    assert render[-1]["done"] == render[-1]["total"] == 13  # 0.5 s at 25 fps, extended from 8 frames
    assert result["event"] == "result" and result["frames"] == 13 and result["rate"] == "25"
    assert result["duration"] == "13/25" and result["engine"] == "preview" and result["output"] == str(out)
    assert media.probe(out).frame_count == 13


def test_redub_error_is_one_line_and_nonzero(tmp_path, capsys):
    audio = write_tone(tmp_path / "line.wav", 0.5)
    argv = [
        "redub",
        "--video",
        str(tmp_path / "missing.mp4"),
        "--audio",
        str(audio),
        "-o",
        str(tmp_path / "o.mp4"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retalk: error:") and "missing.mp4" in err[0]
    assert main([*argv, "--json"]) == 1
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["event"] == "error" and event["type"] == "InputError"
    assert not (tmp_path / "o.mp4").exists()


def test_redub_process_exit_code_on_a_corrupt_video(tmp_path):
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    audio = write_tone(tmp_path / "line.wav", 0.5)
    argv = ["redub", "--video", str(video), "--audio", str(audio), "-o", str(tmp_path / "o.mp4")]
    done = subprocess.run(
        [sys.executable, "-m", "retalk", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "broken.mp4" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4", "line.wav"]


def test_demo_makes_and_redubs_its_own_sample(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    argv = ["demo", "-o", str(out), "--seconds", "0.4", "--text", "Hello there", "--engine", "preview"]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    info = media.probe(out)
    assert result["frames"] == info.frame_count > 10  # the speech is longer than the 10-frame shot: it loops
    assert info.has_audio


def _redub_argv(video, audio, out, *extra):
    return [
        "redub",
        "--video",
        str(video),
        "--audio",
        str(audio),
        "-o",
        str(out),
        "--engine",
        "preview",
        *extra,
    ]


def test_no_face_anywhere_warns_and_exits_3_some_faceless_frames_name_their_ranges(tmp_path, capsys):
    audio = write_tone(tmp_path / "line.wav", 0.5)
    cache = ["--cache-dir", str(tmp_path / "c")]
    faceless = write_face_clip(tmp_path / "wall.mp4", n_frames=6, size=(160, 160), blank_frames=range(6))
    out = tmp_path / "wall_redub.mp4"
    assert main(_redub_argv(faceless, audio, out, *cache)) == 3
    err = capsys.readouterr().err
    assert "retalk: warning: no face found in any of 6 frames: the output is the source" in err
    assert out.is_file()
    assert main(_redub_argv(faceless, audio, out, *cache, "--json")) == 3
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["faceless_ranges"] == [[0, 6]]
    assert "no face found in any of 6 frames: the output is the source" in result["warnings"]

    partly = write_face_clip(tmp_path / "partly.mp4", n_frames=12, size=(160, 160), blank_frames=[2, 3, 4, 9])
    assert main(_redub_argv(partly, audio, tmp_path / "partly_redub.mp4", *cache)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no face" in line]
    assert warnings == [
        "retalk: warning: no face found in 4 of 12 frames (output frames 2-4, 9): they are the source's"
    ]


def test_redub_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["redub", "--help"])
    assert "exit status: 0" in capsys.readouterr().out.replace("\n", " ")


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits, but not sysfs's rules)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    return Path("/sys")


@pytest.mark.parametrize(
    ("output", "codec", "expected"),
    [
        ("{tmp}", "h264", "is a folder; name the output file"),
        ("{tmp}/missing/out.mp4", "h264", "folder {tmp}/missing does not exist"),
        ("{ro}/out.mp4", "h264", "cannot write in {ro}"),
        ("{tmp}/out.avi", "h264", "retalk writes .mp4, .mov, .mkv files"),
        ("{tmp}/out.mp4", "prores", "a .mp4 file cannot hold prores video; use .mov, .mkv (e.g. out.mov)"),
        ("{tmp}/out.mov", "lossless", "a .mov file cannot hold lossless video; use .mkv"),
    ],
)
def test_output_is_checked_before_any_work_in_one_line(
    tmp_path, unwritable_folder, capsys, output, codec, expected
):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=4, size=(160, 160))
    audio = write_tone(tmp_path / "line.wav", 0.5)
    out = output.format(tmp=tmp_path, ro=unwritable_folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = _redub_argv(video, audio, out, "--codec", codec, "--cache-dir", str(tmp_path / "c"), "--json")
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and expected.format(tmp=tmp_path, ro=unwritable_folder) in err[0], err
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert not any(e.get("stage") in ("hash", "track", "render") for e in events)  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even the cache folder


@pytest.mark.parametrize(
    ("suffix", "codec", "format_name"), [(".mov", "h264", "mov"), (".mkv", "prores", "matroska")]
)
def test_the_suffix_picks_the_container(tmp_path, suffix, codec, format_name):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=4, size=(160, 160))
    audio = write_tone(tmp_path / "line.wav", 0.2)
    out = tmp_path / f"out{suffix}"
    argv = _redub_argv(video, audio, out, "--codec", codec, "--cache-dir", str(tmp_path / "c"), "--json")
    assert main(argv) == 0
    with av.open(str(out)) as container:
        assert format_name in container.format.name.split(",")
        assert container.streams.video[0].codec_context.name.startswith(codec[:6])


def test_demo_checks_its_output_before_making_the_sample(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo.avi"), "--engine", "preview"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "retalk writes .mp4, .mov, .mkv files" in err[0]
    )  # no "making a sample" line first


def test_help_imports_no_heavy_module():
    """`retalk --help` lists every command without importing any command module (they bring torch, FFmpeg)."""
    code = (
        "import sys\nfrom retalk.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'av', 'cv2', 'scipy', 'zmq') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"
    assert all(name in done.stdout for name in COMMANDS)


def test_the_command_table_matches_what_each_module_registers():
    for module in sorted({module for module, _ in COMMANDS.values()}):
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"retalk.commands.{module}").register(subparsers)
        registered = {action.dest: action.help for action in subparsers._choices_actions}
        assert registered == {name: text for name, (owner, text) in COMMANDS.items() if owner == module}, (
            module
        )

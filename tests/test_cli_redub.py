"""The ``retalk redub`` and ``retalk demo`` commands: JSON progress and result, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from mediagen import write_face_clip, write_tone

from retalk import media
from retalk.cli import main


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

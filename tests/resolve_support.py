"""Shared by the Resolve tests: the test shot's media, a gated `retalk serve` over it, and what an entry reads
for that shot. No tests here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mediagen import write_face_clip, write_tone
from server_support import GATE_ENV, GATED_RUNNER, ServerProcess

CLIP_FRAMES = 40  # the face drifts monotonically over frames 0..10, so each frame there is unique
SHOT = {"record": 10, "duration": 6, "source_start": 3}  # the timeline item plays source frames 3..8


@dataclass
class Rig:
    media_root: Path  # shot.mp4, line.wav, silence.wav, broken.mp4; the server's media root
    gate: Path  # the server's workers hold each job until the file `open` exists here (open unless a test closes it)
    server: ServerProcess


@contextlib.contextmanager
def gated_rig(tmp_path_factory) -> Iterator[Rig]:
    """The test media and a one-worker `retalk serve` over it, running server_support's gated runner."""
    media_root = tmp_path_factory.mktemp("resolve-media")
    write_face_clip(media_root / "shot.mp4", n_frames=CLIP_FRAMES, size=(160, 160), with_audio=False)
    write_tone(media_root / "line.wav", 2.0)
    write_tone(media_root / "silence.wav", 2.0, silent=True)
    (media_root / "broken.mp4").write_bytes(b"not a video at all" * 100)
    gate = tmp_path_factory.mktemp("gate")
    (gate / "open").touch()
    state = tmp_path_factory.mktemp("resolve-state") / "state"
    server = ServerProcess(
        state, media_root, "--workers", "1", "--runner", GATED_RUNNER, env={GATE_ENV: str(gate)}
    )
    try:
        yield Rig(media_root, gate, server)
    finally:
        server.stop()


def shot_facts(clip: Path, **changes) -> dict:
    """What an entry reads for the test shot (protocol/RESOLVE_BRIDGE.md §3.1): a clip at record 10 playing
    source frames 3..8 of ``clip``; ``changes`` replace facts (``...`` leaves one out)."""
    start, duration = SHOT["source_start"], SHOT["duration"]
    facts = {
        "clip": Path(clip).name,
        "path": str(clip),
        "fps": "25",
        "timeline_fps": "25",
        "record_start": SHOT["record"],
        "record_duration": duration,
        "source_start": start,
        "source_end": start + duration,
        "left_offset": start,
        "takes": 0,
    }
    return {key: value for key, value in dict(facts, **changes).items() if value is not ...}

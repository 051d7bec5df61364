"""Decode and encode speed of retalk.media per clip and codec (a script, not a test).

    python benchmarks/media.py [--shared ../shared/media] [--frames-1080p 30]

Prints frames per second for a full decode (iter_frames, uint8 RGB), a 10-frame range from the middle,
and an encode of the decoded frames with every codec of retalk.media.CODECS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from retalk import media
from retalk.shared import shared_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # mediagen: the project's test-media factory

from mediagen import write_face_clip  # noqa: E402


def _decode_all(path: Path) -> tuple[np.ndarray, float]:
    began = time.perf_counter()
    frames = np.concatenate([chunk.frames for chunk in media.iter_frames(path)])
    return frames, len(frames) / (time.perf_counter() - began)


def _decode_range(path: Path, start: int, count: int) -> float:
    began = time.perf_counter()
    media.read_frames(path, start, start + count)
    return count / (time.perf_counter() - began)


def _encode(frames: np.ndarray, rate: Fraction, codec: str, folder: Path) -> float:
    out = folder / f"bench{media.default_extension(codec)}"
    began = time.perf_counter()
    with media.VideoWriter(
        out, width=frames.shape[2], height=frames.shape[1], rate=rate, codec=codec
    ) as writer:
        for start in range(0, len(frames), 16):
            writer.write(frames[start : start + 16])
    return len(frames) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=shared_dir() / "media")
    parser.add_argument("--frames-1080p", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        clips = [args.shared / "face1.mp4", args.shared / "face2.mp4"]
        clips = [clip for clip in clips if clip.exists()]
        generated = folder / "face_1080p.mp4"
        write_face_clip(generated, n_frames=args.frames_1080p, size=(1920, 1080), with_audio=False)
        clips.append(generated)
        print(
            f"{'clip':<16} {'size':>9} {'frames':>6} {'decode':>8} {'range10':>8} "
            + " ".join(f"{codec:>10}" for codec in media.CODECS)
        )
        for clip in clips:
            info = media.probe(clip)
            frames, decode_fps = _decode_all(clip)
            range_fps = _decode_range(clip, info.frame_count // 2, min(10, info.frame_count // 2))
            encode = [_encode(frames, info.rate, codec, folder) for codec in media.CODECS]
            print(
                f"{clip.name:<16} {info.width}x{info.height:<4} {info.frame_count:>6} {decode_fps:>8.1f} "
                f"{range_fps:>8.1f} " + " ".join(f"{fps:>10.1f}" for fps in encode)
            )
    print("frames per second; decode = whole clip to uint8 RGB; range10 = 10 frames from the middle (seek)")


if __name__ == "__main__":
    main()

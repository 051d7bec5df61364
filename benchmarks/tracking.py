"""Face tracking speed: CPU milliseconds per frame on the shared clips, by detection scale.

    python benchmarks/tracking.py [--media DIR]

For each clip: the reference-like setting (dlib HOG with one up-sampling pass on the full-resolution
frame, as the reference's Croper), detection on a copy downscaled to a 640-px longer side, and the
tracker's settings (a 1024-px longer side until the face is found, then a copy downscaled to a
``detect_face_size``-px face). Also prints how far the landmarks move from the full-resolution setting
(a scale change moves dlib's box and hence its points). Frames are decoded once up front; times are
process CPU time, so they mean something on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from retalk.media import iter_frames
from retalk.shared import shared_dir
from retalk.tracking import DlibDetector, DlibLandmarks, track_faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=shared_dir() / "media")
    args = parser.parse_args()
    landmarker = DlibLandmarks()
    settings = [("full-res (reference)", None, None), ("max side 640", 640, None)] + [
        (f"face {size} px (default 120)" if size == 120 else f"face {size} px", 1024, size)
        for size in (200, 160, 120)
    ]
    for clip in ("face1.mp4", "face2.mp4"):
        frames = np.concatenate([chunk.frames for chunk in iter_frames(args.media / clip)])
        reference = None
        for label, max_side, face_size in settings:
            start = time.process_time()
            track = track_faces(
                frames,
                detector=DlibDetector(max_side=max_side),
                landmarker=landmarker,
                detect_face_size=face_size,
            )
            per_frame = (time.process_time() - start) / len(frames) * 1000
            reference = track.landmarks if reference is None else reference
            moved = np.abs(track.landmarks - reference).mean()
            print(
                f"{clip} {frames.shape[2]}x{frames.shape[1]}  {label:26s} {per_frame:6.1f} ms/frame  "
                f"found {int(track.found.sum())}/{len(track)}  landmarks vs full-res {moved:.2f} px"
            )


if __name__ == "__main__":
    main()

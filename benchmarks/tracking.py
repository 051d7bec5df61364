"""Face tracking speed and accuracy: CPU milliseconds per frame and landmark distance, by tracker setting.

    python benchmarks/tracking.py [--media DIR] [--frames N]

Clips: the shared face1.mp4 and face2.mp4, and a generated 1280x720 clip (the sample shot `retalk bench` makes,
at 720p). Settings: dlib on every frame at full resolution (as the reference's Croper runs it), dlib on every
frame at the face's scale (the tracker's per-frame detection), and the default tracker (detection on key frames,
landmarks following the face between them). For each: process CPU ms per frame (frames are decoded up front, so
this is tracking alone, and CPU time means something on a shared machine), frames found, detector calls, and the
mean and worst-frame landmark distance to per-frame detection, raw and after the tracker's smoothing (what the
engines use).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from retalk.media import iter_frames
from retalk.pipeline.sample import sample_frames
from retalk.shared import shared_dir
from retalk.tracking import DlibDetector, Tracker, _smooth_runs, track_faces


class CountingDetector(DlibDetector):
    """dlib's detector, counting the frames it is asked to search."""

    calls = 0

    def detect(self, frames_rgb: np.ndarray) -> list[np.ndarray]:
        self.calls += len(frames_rgb)
        return super().detect(frames_rgb)


def _distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and worst-frame mean distance (px) between two (N, 68, 2) landmark sets."""
    per_frame = np.hypot(*(a - b).transpose(2, 0, 1)).mean(axis=1)
    return float(per_frame.mean()), float(per_frame.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=shared_dir() / "media")
    parser.add_argument("--frames", type=int, default=125, help="frames of the generated 720p clip")
    args = parser.parse_args()
    clips = {
        name: np.concatenate([chunk.frames for chunk in iter_frames(args.media / name)])
        for name in ("face1.mp4", "face2.mp4")
    }
    clips["generated 1280x720"] = sample_frames(args.frames, (1280, 720))
    settings = {  # per-frame detection first: the others are compared with it
        "every frame, face 120 px": dict(key_interval=None),
        "every frame, full res": dict(detect_face_size=None, key_interval=None, max_side=None),
        "key frames (default)": dict(),
    }
    default = Tracker.__dataclass_fields__
    window, order = default["smooth_window"].default, default["smooth_order"].default
    print("process CPU ms per frame; landmark distance to per-frame detection (every frame, face 120 px)")
    for clip, frames in clips.items():
        reference = None
        for label, setting in settings.items():
            setting = dict(setting)
            detector = CountingDetector(max_side=setting.pop("max_side", 1024))
            start = time.process_time()
            track = track_faces(frames, tracker=Tracker(detector=detector, smooth_window=None, **setting))
            per_frame = (time.process_time() - start) / len(frames) * 1000
            smoothed = _smooth_runs(track.landmarks, track.found, window, order)
            line = (
                f"{clip:20s} {frames.shape[2]}x{frames.shape[1]}  {label:26s} {per_frame:6.1f} ms/frame  "
                f"found {int(track.found.sum())}/{len(track)}  detected {detector.calls}"
            )
            if reference is None:
                reference = track.landmarks, smoothed
            else:
                mean_raw, worst_raw = _distance(track.landmarks, reference[0])
                mean_smooth, worst_smooth = _distance(smoothed, reference[1])
                line += (
                    f"  landmarks: raw {mean_raw:.2f} px mean, {worst_raw:.2f} worst frame; "
                    f"smoothed {mean_smooth:.2f} / {worst_smooth:.2f}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()

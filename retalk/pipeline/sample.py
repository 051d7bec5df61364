"""A small sample shot and a line of speech, made on the spot, for ``retalk demo`` and ``retalk bench``.

The face is a real photograph (``skimage.data.astronaut()``) moved smoothly over the frames; the speech comes
from espeak-ng where it is installed, else from a clearly synthetic vowel-like stand-in.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import soundfile

from retalk import media

SAMPLE_TEXT = "This shot was re-dubbed by retalk. The lips follow the new line of speech, word by word."
_FACE_BOX = (92, 0, 348, 256)  # x0, y0, x1, y1 of a 256 px square around the astronaut's face


def sample_frames(n_frames: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB: the face drifting and breathing in scale over a soft background."""
    width, height = size
    photo = skimage.data.astronaut()
    x0, y0, x1, y1 = _FACE_BOX
    face = photo[y0:y1, x0:x1]
    background = cv2.GaussianBlur(cv2.resize(photo, (width, height)), (0, 0), 12)
    side = int(0.75 * height)
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1) * 2 - 1
    feather = np.clip((1.0 - np.hypot(xx, yy * 0.9)) / 0.15, 0, 1)[..., None].astype(np.float32)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for i in range(n_frames):
        phase = 2 * math.pi * i / max(n_frames, 1)
        scale = side * (1 + 0.04 * math.sin(2 * phase)) / face.shape[0]
        cx = width / 2 + 0.06 * width * math.sin(phase)
        cy = height / 2 + 0.03 * height * math.sin(3 * phase)
        # similarity transform: face centre to (cx, cy) at this scale
        matrix = np.array(
            [[scale, 0, cx - scale * face.shape[1] / 2], [0, scale, cy - scale * face.shape[0] / 2]]
        )
        warped = cv2.warpAffine(face, matrix, (width, height), flags=cv2.INTER_LINEAR).astype(np.float32)
        alpha = cv2.warpAffine(cv2.resize(feather, face.shape[1::-1]), matrix, (width, height))[..., None]
        frames[i] = np.clip(background * (1 - alpha) + warped * alpha + 0.5, 0, 255).astype(np.uint8)
    return frames


def write_sample_clip(
    path: Path,
    *,
    seconds: float = 4.0,
    rate: Fraction = Fraction(25),
    codec: str = "h264",
    size: tuple[int, int] = (640, 480),
) -> Path:
    """A silent sample shot of ``seconds`` at ``rate``, ``size`` = (width, height)."""
    n_frames = max(round(Fraction(seconds) * rate), 1)
    frames = sample_frames(n_frames, size)
    with media.VideoWriter(
        path, width=frames.shape[2], height=frames.shape[1], rate=rate, codec=codec
    ) as writer:
        writer.write(frames)
    return path


def write_sample_speech(path: Path, text: str = SAMPLE_TEXT) -> str | None:
    """A WAV of ``text`` spoken by espeak-ng; where espeak-ng is missing, a synthetic syllable train instead.
    Returns None, or one line saying that the stand-in was used."""
    espeak = shutil.which("espeak-ng") or shutil.which("espeak")
    if espeak is not None:
        done = subprocess.run([espeak, "-w", str(path), text], capture_output=True, check=False)
        if done.returncode == 0 and path.is_file() and path.stat().st_size > 44:
            return None
    soundfile.write(path, _syllable_train(len(text.split()) * 0.35, 16000), 16000)
    return "espeak-ng is not installed (apt install espeak-ng): the demo speaks a synthetic syllable train instead"


def _syllable_train(seconds: float, sample_rate: int) -> np.ndarray:
    """Voiced buzz with two moving formants, chopped into syllables: speech-like loudness for the demo."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rng = np.random.default_rng(0)
    pitch = 120 + 15 * np.sin(2 * np.pi * 0.5 * t)
    buzz = np.sign(np.sin(2 * np.pi * np.cumsum(pitch) / sample_rate))
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 1)), 0, 1) ** 1.5
    formant = np.sin(2 * np.pi * (500 + 300 * np.sin(2 * np.pi * 0.7 * t)) * t)
    return (0.3 * syllables * (0.6 * buzz + 0.4 * formant)).astype(np.float32)

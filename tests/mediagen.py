"""Test media the project makes itself: a real face photo, moving-face clips, speech and tones."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import soundfile
from skimage import data

from retalk.media import VideoWriter, read_audio

# dlib's frontal detector finds the astronaut's face at (175, 76)-(265, 166) in the 512x512 photo
_FACE_CENTRE = (220, 121)
_CROP = 256


def face_image() -> np.ndarray:
    """(256, 256, 3) uint8 RGB crop of skimage's astronaut photo, centred on her face (dlib finds it)."""
    photo = data.astronaut()
    left = _FACE_CENTRE[0] - _CROP // 2
    top = max(0, _FACE_CENTRE[1] - _CROP // 2)
    return np.ascontiguousarray(photo[top : top + _CROP, left : left + _CROP])


def write_tone(path: str | Path, seconds: float, sample_rate: int = 16000, *, silent: bool = False) -> Path:
    """A 16-bit mono wav: a voice-like tone (220 Hz with harmonics) pulsing at 4 Hz like syllables."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return _write_wav(path, np.zeros_like(t) if silent else _tone(t), sample_rate)


def write_speech(
    path: str | Path, text: str = "The quick brown fox jumps over the lazy dog.", sample_rate: int = 16000
) -> Path:
    """Synthesised speech (espeak-ng) as a 16-bit mono wav at `sample_rate`."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; install the apt package espeak-ng")
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
        samples = read_audio(raw, sample_rate=sample_rate)
    return _write_wav(path, samples, sample_rate)


def write_face_clip(
    path: str | Path,
    *,
    n_frames: int = 48,
    rate: Fraction = Fraction(25),
    size: tuple[int, int] = (480, 360),
    codec: str = "h264",
    with_audio: bool = True,
    motion: bool = True,
    blank_frames: Sequence[int] = (),
) -> Path:
    """A clip of the face photo drifting smoothly (translation and scale) over a still background.

    `size` is (width, height). Frames listed in `blank_frames` have the face blacked out. The audio, if
    any, is write_tone's pulsing tone at 16 kHz over the clip's exact duration.
    """
    width, height = size
    face = face_image()
    background = _background(width, height)
    blank = set(blank_frames)
    audio = None
    if with_audio:
        t = np.arange(round(Fraction(n_frames) / Fraction(rate) * 16000)) / 16000
        audio = _tone(t).astype(np.float32)
    with VideoWriter(path, width=width, height=height, rate=rate, codec=codec, audio=audio) as writer:
        for i in range(n_frames):
            phase = 2 * np.pi * i / max(n_frames, 2) if motion else 0.0
            frame = background.copy()
            _paste_face(frame, face, phase, black=i in blank)
            writer.write(frame)
    return Path(path)


def _tone(t: np.ndarray) -> np.ndarray:
    voice = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in (1, 2, 3))
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * 4 * t)
    return 0.3 * voice * syllables


def _write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    soundfile.write(str(path), np.asarray(samples, dtype=np.float32), sample_rate, subtype="PCM_16")
    return Path(path)


def _background(width: int, height: int) -> np.ndarray:
    """A smooth colour gradient: textured enough for an encoder, free of face-like structure."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    channels = (90 + 60 * x + 0 * y, 110 + 40 * y + 0 * x, 140 - 50 * x * y)
    return np.ascontiguousarray(np.stack(channels, axis=-1).astype(np.uint8))


def _paste_face(frame: np.ndarray, face: np.ndarray, phase: float, *, black: bool) -> None:
    """Paste `face` scaled to ~75 % of the frame height, moved by a smooth function of `phase`."""
    height, width = frame.shape[:2]
    side = int(round(0.75 * min(width, height) * (1 + 0.05 * np.sin(phase))))
    scaled = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    cx = width / 2 + 0.05 * width * np.sin(phase)
    cy = height / 2 + 0.03 * height * np.sin(2 * phase)
    left = int(np.clip(round(cx - side / 2), 0, width - side))
    top = int(np.clip(round(cy - side / 2), 0, height - side))
    frame[top : top + side, left : left + side] = 0 if black else scaled

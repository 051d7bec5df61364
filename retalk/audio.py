"""Mel features of the reference (Wav2Lip recipe) and their per-frame windows (docs/DESIGN.md, deviation 7)."""

from __future__ import annotations

import functools
import warnings
from fractions import Fraction

import librosa
import numpy as np
import scipy.signal

from retalk.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200  # 12.5 ms: 80 mel frames per second
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP
N_MELS = 80
CHUNK_FRAMES = 16  # mel frames per network window (0.2 s)
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
SILENCE = -MAX_ABS_VALUE  # the mel value of digital silence (clipped at the bottom of the range)


@functools.cache
def _mel_basis() -> np.ndarray:
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=55, fmax=7600)


def melspectrogram(wav16k: np.ndarray) -> np.ndarray:
    """(80, T) float64 mel spectrogram in [-4, 4] of mono 16 kHz audio, T = 1 + len // 200.

    Silent audio is allowed (it maps to -4 everywhere); NaN/inf or empty audio raises InputError.
    """
    wav = np.asarray(wav16k)
    if wav.ndim != 1 or wav.size == 0:
        raise InputError(f"audio of shape {wav.shape}: expected a non-empty mono 16 kHz signal")
    if not np.all(np.isfinite(wav)):
        raise InputError("the audio contains NaN or infinite samples; fix or re-export the audio file")
    emphasised = scipy.signal.lfilter([1, -PREEMPHASIS], [1], wav)  # float64
    with warnings.catch_warnings():
        # a line shorter than one window (a 1-frame output) is well defined: centring pads it with zeros
        warnings.filterwarnings(
            "ignore", message="n_fft=.* is too large for input signal", category=UserWarning
        )
        spectrum = librosa.stft(
            y=emphasised, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, center=True, pad_mode="constant"
        )
    mel = _mel_basis() @ np.abs(spectrum)
    level_db = 20 * np.log10(np.maximum(10 ** (MIN_LEVEL_DB / 20), mel)) - REF_LEVEL_DB
    scaled = 2 * MAX_ABS_VALUE * (level_db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS_VALUE
    return np.clip(scaled, -MAX_ABS_VALUE, MAX_ABS_VALUE)


def _mel_start(index: int, rate: Fraction) -> int:
    """First mel frame of video frame `index`: floor(index * 80 / fps), exactly for a rational fps."""
    return int(Fraction(index * MEL_FRAMES_PER_SECOND) / Fraction(rate))


def _check(mel: np.ndarray, rate: Fraction) -> np.ndarray:
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise InputError(f"mel of shape {mel.shape}: expected ({N_MELS}, T)")
    if isinstance(rate, float) or Fraction(rate) <= 0:
        raise InputError(f"frame rate {rate!r}: pass a positive Fraction (or int), e.g. Fraction(1350, 61)")
    return mel


def _pad_to(mel: np.ndarray, length: int) -> np.ndarray:
    """`mel` extended with silence to at least `length` frames."""
    missing = length - mel.shape[1]
    return mel if missing <= 0 else np.pad(mel, ((0, 0), (0, missing)), constant_values=SILENCE)


def mel_chunks(mel: np.ndarray, rate: Fraction) -> tuple[np.ndarray, np.ndarray]:
    """The reference's windows: (M, 80, 16) chunks and their start frames.

    Chunk i starts at floor(i * 80 / fps) until a window would run past the end; then the last 16 frames
    close the list. A mel shorter than 16 frames (audio under 0.2 s, a crash in the reference) is padded
    with silence and gives one chunk.
    """
    mel = _pad_to(_check(mel, rate), CHUNK_FRAMES)
    total = mel.shape[1]
    starts = []
    while (start := _mel_start(len(starts), rate)) + CHUNK_FRAMES <= total:
        starts.append(start)
    starts.append(total - CHUNK_FRAMES)
    starts = np.asarray(starts, dtype=np.int64)
    return _windows(mel, starts), starts


def mel_chunks_for_frames(mel: np.ndarray, rate: Fraction, n_frames: int) -> np.ndarray:
    """Exactly `n_frames` chunks (n, 80, 16): chunk i starts at the mel frame of video frame i.

    Windows that run past the end of the audio (the last few frames, or all of them for audio shorter
    than 0.2 s) are completed with silence, so every frame keeps its own timing.
    """
    mel = _check(mel, rate)
    if n_frames < 0:
        raise InputError(f"n_frames must not be negative, got {n_frames}")
    starts = np.asarray([_mel_start(i, rate) for i in range(n_frames)], dtype=np.int64)
    needed = int(starts[-1]) + CHUNK_FRAMES if n_frames else 0
    return _windows(_pad_to(mel, needed), starts)


def _windows(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    offsets = starts[:, None] + np.arange(CHUNK_FRAMES)  # (M, 16) mel frame indices
    return np.ascontiguousarray(mel[:, offsets].transpose(1, 0, 2))  # (80, M, 16) -> (M, 80, 16)

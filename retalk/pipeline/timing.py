"""The output timeline of a re-dub: which source frame each output frame shows, and how long the audio is.

Everything here is exact: frame rates are Fractions and audio lengths are whole samples derived from
``frames / rate * sample_rate`` with one rounding, so video and audio of the output end together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from retalk.errors import InputError

FIT_MODES = ("video", "audio")
EXTEND_MODES = ("loop", "pingpong", "hold")


@dataclass(frozen=True)
class Timeline:
    """Output frame ``i`` shows source frame ``frame_map[i]`` (an index into the whole clip)."""

    frame_map: np.ndarray  # (n_out,) int64, every value in [start, end) of the requested range
    rate: Fraction
    sample_rate: int
    audio_samples: int  # exact length of the output audio at sample_rate
    warnings: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return len(self.frame_map)

    @property
    def duration(self) -> Fraction:
        return Fraction(self.frames) / self.rate


def samples_for_frames(n_frames: int, rate: Fraction, sample_rate: int) -> int:
    """Audio samples covering ``n_frames`` video frames (nearest whole sample, exact arithmetic)."""
    return round(Fraction(n_frames) * sample_rate / rate)


def frames_for_samples(n_samples: int, rate: Fraction, sample_rate: int) -> int:
    """Fewest whole video frames that show all of ``n_samples`` audio samples."""
    return math.ceil(Fraction(n_samples) * rate / sample_rate)


def extend_frame_map(length: int, n_out: int, extend: str) -> np.ndarray:
    """Indices into a range of ``length`` frames for ``n_out`` output frames (``n_out`` may exceed it)."""
    if length < 1:
        raise InputError("the video range is empty: choose --start/--end with at least one frame")
    i = np.arange(n_out, dtype=np.int64)
    if n_out <= length:
        return i
    if extend == "loop":
        return i % length
    if extend == "hold":
        return np.minimum(i, length - 1)
    if extend == "pingpong":
        if length == 1:
            return np.zeros(n_out, dtype=np.int64)
        period = 2 * (length - 1)  # 0,1,..,L-1,L-2,..,1 then repeat: no frame shown twice at a turn
        j = i % period
        return np.where(j < length, j, period - j)
    raise InputError(f"extend={extend!r}: expected one of {', '.join(EXTEND_MODES)}")


def _seconds(n_samples: int, sample_rate: int) -> str:
    return f"{n_samples / sample_rate:.3f} s"


def plan_timeline(
    *,
    start: int,
    end: int,
    rate: Fraction,
    audio_samples: int,
    sample_rate: int,
    fit: str = "video",
    extend: str = "loop",
    audio_complete: bool = True,
) -> Timeline:
    """Plan the output: ``fit="video"`` keeps exactly the frames ``[start, end)`` and pads/trims the audio to
    them; ``fit="audio"`` shows as many frames as the audio needs (trimming the range or extending it).
    ``audio_complete=False``: ``audio_samples`` is only what was read of a longer file (warnings say so)."""
    length = end - start
    if length < 1:
        raise InputError(f"the video range [{start}, {end}) is empty: --end must be greater than --start")
    warnings: list[str] = []
    if fit == "video":
        n_out = length
        out_samples = samples_for_frames(n_out, rate, sample_rate)
        half_frame = samples_for_frames(1, rate, sample_rate) // 2
        if audio_samples > out_samples + half_frame:
            excess = _seconds(audio_samples - out_samples, sample_rate)
            warnings.append(
                f"the new audio is {excess if audio_complete else 'more than ' + excess} longer than the "
                "video range and is cut at its end; use --fit audio to extend the video instead"
            )
        elif audio_samples + half_frame < out_samples:
            warnings.append(
                f"the new audio is {_seconds(out_samples - audio_samples, sample_rate)} shorter than the video "
                f"range and is padded with silence; use --fit audio to shorten the video instead"
            )
        frame_map = np.arange(n_out, dtype=np.int64)
    elif fit == "audio":
        if extend not in EXTEND_MODES:
            raise InputError(f"extend={extend!r}: expected one of {', '.join(EXTEND_MODES)}")
        n_out = max(frames_for_samples(audio_samples, rate, sample_rate), 1)
        out_samples = samples_for_frames(n_out, rate, sample_rate)
        frame_map = extend_frame_map(length, n_out, extend)
    else:
        raise InputError(f"fit={fit!r}: expected one of {', '.join(FIT_MODES)}")
    return Timeline(frame_map + start, rate, sample_rate, out_samples, warnings)


def fit_audio(wav: np.ndarray, n_samples: int) -> np.ndarray:
    """``wav`` cut or padded with silence at its end to exactly ``n_samples`` samples."""
    if len(wav) >= n_samples:
        return wav[:n_samples]
    return np.concatenate([wav, np.zeros(n_samples - len(wav), dtype=wav.dtype)])

"""Output timelines: frame maps for fit video/audio x extend loop/pingpong/hold, exact audio lengths."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from retalk.errors import InputError
from retalk.pipeline.timing import fit_audio, plan_timeline

SR = 16000
RATES = [Fraction(25), Fraction(1350, 61)]


def exact_samples(n_frames: int, rate: Fraction) -> int:
    """Nearest whole sample of n_frames / rate seconds, in integer arithmetic (half rounds to even)."""
    num, den = n_frames * SR * rate.denominator, rate.numerator
    q, r = divmod(num, den)
    return q + (1 if 2 * r > den or (2 * r == den and q % 2) else 0)


@pytest.mark.parametrize("rate", RATES)
def test_fit_video_keeps_the_range_and_sizes_the_audio_to_it(rate):
    t = plan_timeline(start=10, end=110, rate=rate, audio_samples=exact_samples(100, rate), sample_rate=SR)
    assert t.frame_map.tolist() == list(range(10, 110))
    assert t.audio_samples == exact_samples(100, rate)
    assert t.duration == Fraction(100) / rate
    assert t.warnings == []


@pytest.mark.parametrize("rate", RATES)
def test_fit_video_warns_when_the_audio_is_cut_or_padded(rate):
    longer = plan_timeline(start=0, end=50, rate=rate, audio_samples=3 * SR, sample_rate=SR)
    shorter = plan_timeline(start=0, end=50, rate=rate, audio_samples=SR // 2, sample_rate=SR)
    for t in (longer, shorter):
        assert t.frames == 50 and t.audio_samples == exact_samples(50, rate)
    assert len(longer.warnings) == 1 and "cut" in longer.warnings[0]
    assert len(shorter.warnings) == 1 and "padded with silence" in shorter.warnings[0]


def test_fit_video_says_when_it_read_only_part_of_a_longer_audio():
    """The pipeline reads the range plus 1 s of a --fit video line: the cut is then a lower bound."""
    rate = Fraction(25)
    partial = plan_timeline(
        start=0, end=25, rate=rate, audio_samples=2 * SR, sample_rate=SR, audio_complete=False
    )
    complete = plan_timeline(start=0, end=25, rate=rate, audio_samples=2 * SR, sample_rate=SR)
    assert "is more than 1.000 s longer" in partial.warnings[0]
    assert "is 1.000 s longer" in complete.warnings[0]


EXPECTED_MAPS = {  # a 5-frame range [3, 8) shown for 13 output frames
    "loop": [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4, 5],
    "pingpong": [3, 4, 5, 6, 7, 6, 5, 4, 3, 4, 5, 6, 7],
    "hold": [3, 4, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7],
}


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("extend", sorted(EXPECTED_MAPS))
def test_fit_audio_extends_the_range(rate, extend):
    audio = exact_samples(13, rate) - 7  # a little less than 13 frames: 13 frames are needed to show it all
    t = plan_timeline(
        start=3, end=8, rate=rate, audio_samples=audio, sample_rate=SR, fit="audio", extend=extend
    )
    assert t.frame_map.tolist() == EXPECTED_MAPS[extend]
    assert t.audio_samples == exact_samples(13, rate)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("audio", [1, 999, SR, 2 * SR + 1, 3 * SR + 12345])
def test_fit_audio_shows_all_of_the_audio_and_no_more_than_a_frame_extra(rate, audio):
    t = plan_timeline(start=0, end=1000, rate=rate, audio_samples=audio, sample_rate=SR, fit="audio")
    n = t.frames
    assert Fraction(n) / rate * SR >= audio > Fraction(n - 1) / rate * SR
    assert t.frame_map.tolist() == list(range(n))  # shorter than the range: its first frames, in order
    assert t.audio_samples == exact_samples(n, rate)


def test_pingpong_of_a_single_frame_holds_it():
    t = plan_timeline(
        start=4, end=5, rate=Fraction(25), audio_samples=SR, sample_rate=SR, fit="audio", extend="pingpong"
    )
    assert t.frames == 25 and set(t.frame_map.tolist()) == {4}


def test_fit_audio_pads_or_trims_sample_exactly():
    wav = np.arange(1, 11, dtype=np.float32)
    assert fit_audio(wav, 4).tolist() == [1, 2, 3, 4]
    padded = fit_audio(wav, 13)
    assert padded.dtype == np.float32 and padded.tolist() == list(range(1, 11)) + [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 5, "end": 5},
        {"start": 0, "end": 10, "fit": "both"},
        {"start": 0, "end": 10, "fit": "audio", "extend": "bounce"},
    ],
)
def test_bad_plans_are_refused(kwargs):
    with pytest.raises(InputError):
        plan_timeline(rate=Fraction(25), audio_samples=SR, sample_rate=SR, **kwargs)

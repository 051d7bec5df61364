"""retalk.audio against the reference's golden mel features, plus the per-frame window rule."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from retalk import audio, media
from retalk.errors import InputError

# golden/functions.npz stores the reference's float fps under its repr
GOLDEN_RATES = {"25": Fraction(25), "22.131147540983605": Fraction(1350, 61)}


@pytest.mark.golden
def test_mel_matches_reference(golden_functions):
    mel = audio.melspectrogram(golden_functions["audio.wav16k_first3s"])
    reference = golden_functions["audio.mel_first3s"]
    assert mel.shape == reference.shape == (80, 241) and mel.dtype == np.float64
    np.testing.assert_allclose(mel, reference, rtol=0, atol=1e-6)


@pytest.mark.golden
def test_mel_of_the_other_resampler_matches_its_reference_too(golden_functions):
    mel = audio.melspectrogram(golden_functions["audio.wav16k_first3s_soxr_hq"])
    np.testing.assert_allclose(mel, golden_functions["audio.mel_first3s_from_soxr_hq"], rtol=0, atol=1e-6)


@pytest.mark.golden
@pytest.mark.parametrize("fps", list(GOLDEN_RATES))
def test_chunks_match_reference_for_exact_rational_rate(golden_functions, fps):
    chunks, starts = audio.mel_chunks(golden_functions["audio.mel_first3s"], GOLDEN_RATES[fps])
    np.testing.assert_array_equal(starts, golden_functions[f"audio.mel_chunk_starts_fps{fps}"])
    np.testing.assert_array_equal(chunks, golden_functions[f"audio.mel_chunks_fps{fps}"])


@pytest.mark.golden
def test_read_audio_reproduces_reference_loader(golden_functions, media_dir):
    """speech1.wav is the reference's examples/audio/1.wav: librosa 0.9.2 load = resampy kaiser_best."""
    wav = media.read_audio(media_dir / "speech1.wav", duration=Fraction(3))
    reference = golden_functions["audio.wav16k_first3s"]
    assert wav.shape == reference.shape and wav.dtype == np.float32
    np.testing.assert_allclose(wav, reference, rtol=0, atol=1e-6)
    assert len(media.read_audio(media_dir / "speech1.wav")) == int(golden_functions["audio.wav16k_full_len"])


@pytest.mark.parametrize("rate", [Fraction(25), Fraction(1350, 61), Fraction(30000, 1001), Fraction(24)])
def test_exact_rule_agrees_with_reference_float_rule_on_long_clips(rate):
    """The reference computes int(i * 80 / fps) with a float fps; the exact rule agrees for an hour of frames."""
    frames = np.arange(int(3600 * rate))
    float_rule = (frames * 80 / float(rate)).astype(np.int64)
    exact_rule = (frames * 80 * rate.denominator) // rate.numerator
    np.testing.assert_array_equal(float_rule, exact_rule)
    _, starts = audio.mel_chunks(np.zeros((80, 2000)), rate)
    np.testing.assert_array_equal(starts[:-1], exact_rule[: len(starts) - 1])


def test_exact_rule_differs_from_float_rule_where_a_frame_falls_on_a_mel_frame():
    """At 24000/1001 fps, frame 300 starts exactly at mel frame 1001 (12.5125 s); the float rule says 1000."""
    rate = Fraction(24000, 1001)
    assert int(300 * 80 / float(rate)) == 1000
    _, starts = audio.mel_chunks(np.zeros((80, 1100)), rate)
    assert starts[300] == 1001 and starts[299] == 997
    assert audio.mel_chunks_for_frames(np.arange(80 * 1100.0).reshape(80, 1100), rate, 301)[300, 0, 0] == 1001


def test_chunks_for_frames_follow_frame_times_and_pad_with_silence():
    rng = np.random.default_rng(0)
    mel = rng.uniform(-4, 4, size=(80, 100))
    rate = Fraction(1350, 61)
    reference_chunks, reference_starts = audio.mel_chunks(mel, rate)
    n_frames = 40  # more frames than the audio covers: the reference would stop at len(reference_chunks)
    chunks = audio.mel_chunks_for_frames(mel, rate, n_frames)
    assert chunks.shape == (n_frames, 80, 16) and chunks.flags.c_contiguous
    # every chunk before the reference's clamped last one is the reference's chunk
    np.testing.assert_array_equal(chunks[: len(reference_chunks) - 1], reference_chunks[:-1])
    for i in range(n_frames):
        start = int(i * 80 / rate)  # video frame i's time in mel frames
        inside = min(16, max(0, 100 - start))
        np.testing.assert_array_equal(chunks[i, :, :inside], mel[:, start : start + inside])
        assert np.all(chunks[i, :, inside:] == -4.0)


def test_short_audio_is_padded_never_a_crash():
    mel = audio.melspectrogram(np.full(1000, 0.1, dtype=np.float32))  # 62.5 ms: 6 mel frames
    assert mel.shape == (80, 6)
    chunks = audio.mel_chunks_for_frames(mel, Fraction(25), 3)
    assert chunks.shape == (3, 80, 16)
    np.testing.assert_array_equal(chunks[0, :, :6], mel)
    reference_rule, starts = audio.mel_chunks(mel, Fraction(25))
    # padded to 16 frames, the reference rule gives its usual pair for T == 16: a window at 0, then the last 16
    assert reference_rule.shape == (2, 80, 16) and list(starts) == [0, 0]
    assert audio.mel_chunks_for_frames(mel, Fraction(25), 0).shape == (0, 80, 16)


def test_silence_is_allowed_and_maps_to_the_floor():
    mel = audio.melspectrogram(np.zeros(16000, dtype=np.float32))
    assert mel.shape == (80, 81) and np.all(mel == -4.0)


def test_mel_range_and_length_rule():
    t = np.arange(12345) / 16000
    mel = audio.melspectrogram((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert mel.shape == (80, 1 + 12345 // 200)
    assert mel.min() >= -4 and mel.max() <= 4 and mel.max() > 0


@pytest.mark.parametrize(
    "bad", [np.array([0.0, np.nan, 0.1]), np.array([np.inf] * 400), np.zeros(0), np.zeros((2, 400))]
)
def test_unusable_audio_raises_input_error(bad):
    with pytest.raises(InputError) as err:
        audio.melspectrogram(bad)
    assert "\n" not in str(err.value)


def test_float_rate_and_bad_shapes_are_refused():
    with pytest.raises(InputError):
        audio.mel_chunks(np.zeros((80, 50)), 25.0)
    with pytest.raises(InputError):
        audio.mel_chunks_for_frames(np.zeros((40, 50)), Fraction(25), 3)
    with pytest.raises(InputError):
        audio.mel_chunks_for_frames(np.zeros((80, 50)), Fraction(25), -1)


def test_a_line_shorter_than_one_window_gives_frames_without_a_warning(recwarn):
    """A one-frame output at 25 fps is 640 samples at 16 kHz, less than the 800-sample window."""
    mel = audio.melspectrogram(np.random.default_rng(0).normal(0, 0.1, 640))
    assert mel.shape == (80, 1 + 640 // 200) and np.isfinite(mel).all()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]

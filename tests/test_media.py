"""retalk.media: frame-exact ranges, exact rates, codecs, colour tags, sample-exact audio, clean failures."""

from __future__ import annotations

import hashlib
import shutil
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from mediagen import face_image, write_face_clip, write_speech, write_tone

from retalk import media
from retalk.errors import InputError, MediaError

RATE_1350_61 = Fraction(1350, 61)


def _rolling_frames(n: int, width: int = 160, height: int = 96) -> np.ndarray:
    """n distinct frames (the face photo scrolled a few pixels per frame), so an off-by-one shows."""
    face = np.tile(face_image(), (1, 2, 1))[:height]
    return np.stack([np.roll(face, 5 * i, axis=1)[:, :width] for i in range(n)])


def _encode_h264(path: Path, frames: np.ndarray, rate: Fraction, *, gop: int, pix_fmt: str) -> Path:
    """An H.264 clip made with PyAV directly (not VideoWriter): keyframe every `gop` frames, B-frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = 2
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _sequential_decode(path: Path, pixel_format: str = "rgb24") -> np.ndarray:
    """Every frame, decoded front to back with plain PyAV: the reference for ranged decoding."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format=pixel_format) for frame in container.decode(video=0)])


def _keyframe_indices(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    order = np.argsort([p.pts for p in packets])
    return [rank for rank, i in enumerate(order) if packets[i].is_keyframe]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    frames = _rolling_frames(40)
    clips = {
        "h264_gop12_bframes.mp4": _encode_h264(
            folder / "h264_gop12_bframes.mp4", frames, Fraction(25), gop=12, pix_fmt="yuv420p"
        ),
        "h264_gop12_bframes.mkv": _encode_h264(
            folder / "h264_gop12_bframes.mkv", frames, RATE_1350_61, gop=12, pix_fmt="yuv420p"
        ),
        "h264_10bit_gop12.mp4": _encode_h264(
            folder / "h264_10bit_gop12.mp4", frames, Fraction(30000, 1001), gop=12, pix_fmt="yuv420p10le"
        ),
    }
    for codec in ("prores", "lossless"):
        path = folder / f"writer_{codec}{media.default_extension(codec)}"
        with media.VideoWriter(path, width=160, height=96, rate=RATE_1350_61, codec=codec) as writer:
            writer.write(frames)
        clips[path.name] = path
    return clips


def _ranges(frame_count: int, keyframes: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Ranges at and just around keyframes, at the very end, and at random."""
    ranges = [(frame_count - 1, frame_count), (0, 3)]
    for key in keyframes[1:3]:
        ranges += [(key - 1, key + 2), (key, min(key + 7, frame_count))]
    for _ in range(3):
        start = int(rng.integers(0, frame_count - 1))
        ranges.append((start, int(rng.integers(start + 1, min(start + 20, frame_count) + 1))))
    return ranges


def _check_ranges(path: Path, reference: np.ndarray, *, high_bit_depth: bool = False) -> None:
    rng = np.random.default_rng(7)
    frame_count = len(reference)
    assert media.probe(path).frame_count == frame_count
    for start, end in _ranges(frame_count, _keyframe_indices(path), rng):
        chunks = list(media.iter_frames(path, start, end, chunk_size=4, high_bit_depth=high_bit_depth))
        assert [c.start for c in chunks] == list(range(start, end, 4))
        assert all(1 <= len(c.frames) <= 4 and c.frames.flags.c_contiguous for c in chunks)
        got = np.concatenate([c.frames for c in chunks])
        assert got.dtype == reference.dtype
        np.testing.assert_array_equal(got, reference[start:end], err_msg=f"{path.name} [{start}, {end})")


def test_chunk_buffers_are_reused_only_once_nothing_refers_to_them(generated):
    buffers = media._ChunkBuffers()
    first = buffers.take((2, 4, 4, 3), np.uint8)
    first_ref = weakref.ref(first)
    assert buffers.take((2, 4, 4, 3), np.uint8) is not first  # still held
    view = first[1]
    del first
    assert buffers.take((2, 4, 4, 3), np.uint8) is not view.base  # a view still refers to it
    del view
    assert buffers.take((2, 4, 4, 3), np.uint8) is first_ref()  # let go: used again
    # a consumer that keeps chunks, or views of them, finds them as decoded
    path = generated["h264_gop12_bframes.mp4"]
    reference = _sequential_decode(path)
    kept, views = {}, {}
    for chunk in media.iter_frames(path, 0, 40, chunk_size=3):
        if chunk.start % 9 == 0:
            kept[chunk.start] = chunk.frames
        elif chunk.start % 9 == 3:
            views[chunk.start + len(chunk.frames) - 1] = chunk.frames[-1]
    for start, frames in kept.items():
        np.testing.assert_array_equal(frames, reference[start : start + len(frames)])
    for index, frame in views.items():
        np.testing.assert_array_equal(frame, reference[index])


def _packet_digest(path: Path, start: int, end: int) -> str:
    sha = hashlib.sha256()
    assert list(media.hash_packets(path, start, end, sha, every=4))[-1] == end - start
    return sha.hexdigest()


def _remux(source: Path, target: Path) -> Path:
    """The same video packets in another container."""
    with av.open(str(source)) as given, av.open(str(target), "w") as out:
        stream = out.add_stream_from_template(given.streams.video[0])
        for packet in given.demux(video=0):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    return target


def test_packet_digest_changes_with_the_frames_of_its_range_and_survives_a_remux(tmp_path):
    frames = _rolling_frames(40)
    changed = frames.copy()
    changed[20, 30:60, 40:80] = 255 - changed[20, 30:60, 40:80]  # one frame of the third keyframe interval
    original = _encode_h264(tmp_path / "a.mp4", frames, Fraction(25), gop=12, pix_fmt="yuv420p")
    other = _encode_h264(tmp_path / "b.mp4", changed, Fraction(25), gop=12, pix_fmt="yuv420p")
    remuxed = _remux(original, tmp_path / "a.mkv")
    decoded, decoded_other = _sequential_decode(original), _sequential_decode(other)
    ranges = sorted(
        {(start, end) for start in range(0, 40, 3) for end in (start + 1, start + 5, 40) if end <= 40}
    )
    digests = {(start, end): _packet_digest(original, start, end) for start, end in ranges}
    assert len(set(digests.values())) == len(ranges)  # each range its own digest
    for (start, end), digest in digests.items():
        assert _packet_digest(remuxed, start, end) == digest, f"[{start}, {end})"
        if _packet_digest(other, start, end) == digest:  # the same digest only for the same frames
            np.testing.assert_array_equal(decoded[start:end], decoded_other[start:end])
            assert not start <= 20 < end
        else:  # the packets of the keyframe interval before the change are the same
            assert end > 12, f"[{start}, {end}) lies before the change's keyframe interval"


@pytest.mark.parametrize("name", ["face1.mp4", "face2.mp4"])
def test_ranges_of_shared_clips_match_sequential_decode(media_dir, name):
    _check_ranges(media_dir / name, _sequential_decode(media_dir / name))


@pytest.mark.parametrize(
    "name", ["h264_gop12_bframes.mp4", "h264_gop12_bframes.mkv", "writer_prores.mov", "writer_lossless.mkv"]
)
def test_ranges_of_generated_clips_match_sequential_decode(generated, name):
    _check_ranges(generated[name], _sequential_decode(generated[name]))


def test_ranges_of_10bit_clip_match_sequential_decode(generated):
    path = generated["h264_10bit_gop12.mp4"]
    info = media.probe(path)
    assert (info.pix_fmt, info.bit_depth, info.rate) == ("yuv420p10le", 10, Fraction(30000, 1001))
    _check_ranges(path, _sequential_decode(path, "rgb48le"), high_bit_depth=True)
    _check_ranges(path, _sequential_decode(path))


def test_shared_clips_probe_exactly(media_dir):
    face1, face2 = media.probe(media_dir / "face1.mp4"), media.probe(media_dir / "face2.mp4")
    assert (face1.width, face1.height, face1.rate, face1.frame_count) == (700, 700, RATE_1350_61, 135)
    assert face1.duration == Fraction(135) / RATE_1350_61
    assert (face2.width, face2.height, face2.rate, face2.frame_count) == (844, 844, Fraction(25), 125)
    assert face2.duration == 5
    assert face1.has_audio and (face1.audio_rate, face1.audio_channels) == (44100, 2)
    assert isinstance(face1.rate, Fraction) and isinstance(face1.duration, Fraction)


def test_face1_round_trips_through_writer_with_exact_rate_count_and_duration(media_dir, tmp_path):
    source = media_dir / "face1.mp4"
    info = media.probe(source)
    sound = media.read_audio(source)
    out = tmp_path / "face1.mkv"
    with media.VideoWriter(
        out, width=info.width, height=info.height, rate=info.rate, codec="lossless", audio=sound
    ) as writer:
        for chunk in media.iter_frames(source, chunk_size=32):
            writer.write(chunk.frames)
    back = media.probe(out)
    assert (back.rate, back.frame_count, back.duration) == (RATE_1350_61, 135, Fraction(61, 10))
    assert (back.width, back.height, back.audio_rate) == (700, 700, 16000)
    np.testing.assert_array_equal(media.read_frames(out, 130, 135), media.read_frames(source, 130, 135))


@pytest.mark.parametrize("codec", list(media.CODECS))
def test_each_codec_decodes_back_with_size_rate_and_length(codec, tmp_path):
    frames = _rolling_frames(9)
    sound = np.sin(np.arange(8000) * 0.05).astype(np.float32) * 0.5
    out = tmp_path / f"clip{media.default_extension(codec)}"
    with media.VideoWriter(out, width=160, height=96, rate=RATE_1350_61, codec=codec, audio=sound) as writer:
        writer.write(frames[:4])
        for frame in frames[4:]:
            writer.write(frame)  # (H, W, 3) works too
    info = media.probe(out)
    assert (info.width, info.height, info.rate, info.frame_count) == (160, 96, RATE_1350_61, 9)
    assert info.duration == 9 / RATE_1350_61
    back = media.read_frames(out, 0, 9)
    error = np.abs(back.astype(int) - frames)
    if codec == "lossless":
        assert error.max() == 0
    else:
        assert error.mean() < 4  # a lossy encode of the same picture, not another picture
    times = [float(t) for chunk in media.iter_frames(out, 3, 6, chunk_size=2) for t in chunk.times]
    exact = [media.frame_time(i, info.rate) for i in (3, 4, 5)]
    if codec == "lossless":  # Matroska keeps milliseconds
        np.testing.assert_allclose(times, [float(t) for t in exact], rtol=0, atol=0.0005)
    else:
        assert [t for chunk in media.iter_frames(out, 3, 6) for t in chunk.times] == exact
    sound_back = media.read_audio(out)
    assert info.has_audio and info.audio_rate == 16000
    assert len(sound_back) == len(sound)  # AAC too: its last frame's padding is cut by the edit list
    if codec != "h264":  # PCM: the samples come back (24-bit quantisation); AAC is lossy
        np.testing.assert_allclose(sound_back, sound, atol=1e-6)


@pytest.mark.parametrize("codec", ["h264", "prores", "prores4444"])
@pytest.mark.parametrize(
    "color",
    [
        media.ColorInfo("tv", "bt709", "bt709", "bt709"),
        media.ColorInfo("tv", "bt2020", "smpte2084", "bt2020nc"),
    ],
)
def test_colour_tags_are_carried(codec, color, tmp_path):
    out = tmp_path / f"tagged{media.default_extension(codec)}"
    with media.VideoWriter(out, width=64, height=64, rate=Fraction(25), codec=codec, color=color) as writer:
        writer.write(_rolling_frames(2, 64, 64))
    assert media.probe(out).color == color


def test_full_range_tag_is_carried_by_h264_and_rgb_codecs_tag_their_matrix(tmp_path):
    color = media.ColorInfo("pc", "bt709", "iec61966-2-1", "bt709")
    for codec, expected in [
        ("h264", color),
        ("lossless", media.ColorInfo("pc", "bt709", "iec61966-2-1", "gbr")),
    ]:
        out = tmp_path / f"full{media.default_extension(codec)}"
        with media.VideoWriter(
            out, width=64, height=64, rate=Fraction(25), codec=codec, color=color
        ) as writer:
            writer.write(_rolling_frames(2, 64, 64))
        assert media.probe(out).color == expected


def test_matrix_tag_drives_the_colour_conversion(tmp_path):
    """Saturated flat colours written as BT.709 come back right, and read as BT.601 they would not."""
    patches = np.zeros((64, 64, 3), np.uint8)
    patches[:32, :32], patches[:32, 32:], patches[32:, :32], patches[32:, 32:] = (
        (220, 30, 30),
        (30, 200, 40),
        (40, 40, 210),
        (230, 210, 40),
    )
    out = tmp_path / "bt709.mp4"
    color = media.ColorInfo("tv", "bt709", "bt709", "bt709")
    with media.VideoWriter(out, width=64, height=64, rate=Fraction(25), codec="h264", color=color) as writer:
        writer.write(patches)
    ours = media.read_frames(out, 0, 1)[0].astype(int)
    with av.open(str(out)) as container:
        frame = next(container.decode(video=0))
        as_601 = frame.to_ndarray(format="rgb24", src_colorspace="ITU601").astype(int)
    inner = (slice(4, 28), slice(4, 28))  # away from the chroma edges between patches
    assert np.abs(ours - patches)[inner].max() <= 5  # CRF 18 quantisation of flat chroma
    assert np.abs(as_601 - patches)[inner].max() >= 15


@pytest.mark.parametrize("name", ["speech1.wav", "face2.mp4"])
def test_audio_ranges_are_sample_exact(media_dir, name):
    path = media_dir / name
    full = media.read_audio(path)
    rng = np.random.default_rng(3)
    for _ in range(4):
        start = Fraction(int(rng.integers(0, 4000)), 1000)
        duration = Fraction(int(rng.integers(1, 1500)), 997)
        got = media.read_audio(path, start=start, duration=duration)
        first = round(start * 16000)
        expected = full[first : first + round(duration * 16000)]
        assert got.shape == expected.shape and got.dtype == np.float32
        # the window is resampled alone: the same samples, up to float rounding of resampy's time register
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_audio_at_source_rate_is_the_plain_channel_average(media_dir):
    path = media_dir / "speech1.wav"
    stereo, rate = soundfile.read(path, dtype="float32", always_2d=True)
    expected = stereo.mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(media.read_audio(path, sample_rate=rate), expected)
    start, duration = Fraction(12345, rate), Fraction(777, rate)
    got = media.read_audio(path, start=start, duration=duration, sample_rate=rate)
    np.testing.assert_array_equal(got, expected[12345 : 12345 + 777])


@pytest.mark.parametrize("name", ["speech1.wav", "face1.mp4"])
def test_audio_at_several_rates_from_one_decode_is_each_rates_own_read(media_dir, name):
    path = media_dir / name
    for start, duration in [(Fraction(0), None), (Fraction(1234, 1000), Fraction(1500, 997))]:
        both = media.read_audio_rates(path, (16000, 48000), start=start, duration=duration)
        for rate, got in zip((16000, 48000), both, strict=True):
            alone = media.read_audio(path, start=start, duration=duration, sample_rate=rate)
            np.testing.assert_array_equal(got, alone)


@pytest.mark.parametrize(
    "rates, length",
    [
        ((44100, 16000), 44100 * 3 + 17),
        ((44100, 48000), 88205),
        ((16000, 48000), 1601),
        ((48000, 16000), 4800),
        ((22050, 16000), 3),
        ((8000, 16000), 100),
    ],
)
def test_resampling_is_librosas_kaiser_best_bit_for_bit(rates, length):
    import librosa  # the reference's resampler, through numba: only here, never on the pipeline's path

    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    expected = librosa.resample(x, orig_sr=rates[0], target_sr=rates[1], res_type="kaiser_best")
    np.testing.assert_array_equal(media.resample_kaiser_best(x, *rates), expected)


def test_audio_past_the_end_is_short_not_padded(tmp_path):
    path = write_tone(tmp_path / "tone.wav", 1.0)
    assert len(media.read_audio(path, start=Fraction(1, 2), duration=Fraction(2))) == 8000
    assert len(media.read_audio(path, start=Fraction(3))) == 0


# --- bad input ----------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.fixture(scope="module")
def broken(tmp_path_factory, generated) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken")
    noise = folder / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    whole = generated["h264_gop12_bframes.mp4"].read_bytes()
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(whole[: len(whole) // 2])
    silent_clip = write_face_clip(folder / "no_audio.mp4", n_frames=4, size=(64, 64), with_audio=False)
    return {
        "noise": noise,
        "truncated": truncated,
        "wav": write_tone(folder / "tone.wav", 0.5),
        "no_audio": silent_clip,
        "missing": folder / "missing.mp4",
    }


@pytest.mark.parametrize("kind", ["noise", "truncated", "missing"])
def test_unreadable_files_raise_media_error(broken, kind):
    path = broken[kind]
    with pytest.raises(MediaError) as err:
        media.probe(path)
        list(media.iter_frames(path))
    _one_line(err, str(path))
    with pytest.raises(MediaError):
        media.read_audio(path)


def test_truncated_mp4_with_index_up_front_raises_media_error(tmp_path, generated):
    frames = media.read_frames(generated["writer_lossless.mkv"], 0, 40)
    whole = tmp_path / "faststart.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert media.probe(whole).frame_count == 40
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(MediaError) as err:
        media.probe(truncated)
    _one_line(err, str(truncated), "truncated")


def test_file_without_video_stream_raises_media_error(broken):
    with pytest.raises(MediaError) as err:
        media.probe(broken["wav"])
    _one_line(err, "no video stream")
    with pytest.raises(MediaError):
        next(media.iter_frames(broken["wav"]))


def test_file_without_audio_stream_raises_media_error(broken):
    assert media.probe(broken["no_audio"]).has_audio is False
    with pytest.raises(MediaError) as err:
        media.read_audio(broken["no_audio"])
    _one_line(err, "no audio stream")


def test_bad_ranges_and_writer_arguments_raise_input_error(generated, tmp_path):
    path = generated["writer_lossless.mkv"]
    for start, end in [(-1, 3), (5, 2), (0, 41)]:
        with pytest.raises(InputError) as err:
            next(media.iter_frames(path, start, end))
        _one_line(err, "40 frames")
    assert list(media.iter_frames(path, 40, 40)) == []
    with pytest.raises(InputError):
        media.VideoWriter(tmp_path / "a.mp4", width=64, height=64, rate=25.0)
    with pytest.raises(InputError):
        media.VideoWriter(tmp_path / "a.mp4", width=65, height=64, rate=Fraction(25))
    with pytest.raises(InputError):
        media.VideoWriter(tmp_path / "a.webm", width=64, height=64, rate=Fraction(25), codec="vp9")
    with pytest.raises(InputError):
        media.VideoWriter(
            tmp_path / "a.mp4", width=64, height=64, rate=Fraction(25), audio=np.full(9, np.nan)
        )
    with media.VideoWriter(tmp_path / "a.mp4", width=64, height=64, rate=Fraction(25)) as writer:
        with pytest.raises(InputError):
            writer.write(np.zeros((1, 64, 32, 3), np.uint8))
        writer.write(np.zeros((64, 64, 3), np.uint8))
    assert media.probe(tmp_path / "a.mp4").frame_count == 1
    with pytest.raises(MediaError):
        media.VideoWriter(tmp_path / "no" / "a.mp4", width=64, height=64, rate=Fraction(25))


@pytest.mark.parametrize("codec", sorted(media.CODECS))
@pytest.mark.parametrize("suffix", sorted(media.CONTAINERS))
def test_the_suffix_picks_the_container_and_refuses_one_that_cannot_hold_the_codec(tmp_path, codec, suffix):
    path = (
        tmp_path / f"take{suffix.upper() if suffix == '.mov' else suffix}"
    )  # the suffix's case is no matter
    if suffix not in media.CODECS[codec].suffixes:
        with pytest.raises(InputError) as err:
            media.VideoWriter(path, width=64, height=64, rate=Fraction(25), codec=codec)
        _one_line(err, f"cannot hold {codec}")
        assert list(tmp_path.iterdir()) == []
        return
    sound = np.zeros(4000, np.float32)
    with media.VideoWriter(path, width=64, height=64, rate=Fraction(25), codec=codec, audio=sound) as writer:
        writer.write(_rolling_frames(2, 64, 64))
    with av.open(str(path)) as container:
        assert media.CONTAINERS[suffix] in container.format.name.split(",")
        assert container.streams.video[0].frames in (0, 2)  # Matroska does not count frames in its header
    assert media.probe(path).frame_count == 2


def test_writer_refuses_a_suffix_it_does_not_write(tmp_path):
    with pytest.raises(InputError) as err:
        media.VideoWriter(tmp_path / "take.avi", width=64, height=64, rate=Fraction(25))
    _one_line(err, ".mp4, .mov, .mkv")


def test_writer_abort_leaves_nothing_and_keeps_an_existing_file(tmp_path):
    frames = _rolling_frames(3, 64, 64)
    with pytest.raises(RuntimeError):
        with media.VideoWriter(tmp_path / "new.mp4", width=64, height=64, rate=Fraction(25)) as writer:
            writer.write(frames)
            raise RuntimeError("stop half-way")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing.mov"
    existing.write_bytes(b"the previous take")
    writer = media.VideoWriter(existing, width=64, height=64, rate=Fraction(25), codec="prores")
    writer.write(frames)
    assert len(list(tmp_path.iterdir())) == 2  # the temp file sits beside the target while writing
    writer.abort()
    assert list(tmp_path.iterdir()) == [existing] and existing.read_bytes() == b"the previous take"


def test_close_replaces_an_existing_file_atomically(tmp_path):
    target = tmp_path / "take.mkv"
    shutil.copyfile(write_tone(tmp_path / "tone.wav", 0.1), target)
    with media.VideoWriter(target, width=64, height=64, rate=Fraction(24), codec="lossless") as writer:
        writer.write(_rolling_frames(2, 64, 64))
    assert media.probe(target).frame_count == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["take.mkv", "tone.wav"]


# --- the test-media factory ---------------------------------------------------------------------------------


def test_face_clip_has_a_detectable_moving_face_except_in_blank_frames(tmp_path):
    import dlib

    path = write_face_clip(tmp_path / "face.mp4", n_frames=12, blank_frames=[4])
    info = media.probe(path)
    assert (info.width, info.height, info.rate, info.frame_count, info.has_audio) == (480, 360, 25, 12, True)
    assert len(media.read_audio(path)) == round(Fraction(12, 25) * 16000)
    frames = media.read_frames(path, 0, 12)
    detector = dlib.get_frontal_face_detector()
    boxes = {i: detector(frames[i], 0) for i in (0, 3, 4)}
    assert len(boxes[0]) == len(boxes[3]) == 1 and len(boxes[4]) == 0
    assert boxes[0][0].center() != boxes[3][0].center()


def test_speech_and_tones_are_audible_or_silent_as_asked(tmp_path):
    speech = media.read_audio(write_speech(tmp_path / "speech.wav", "Hello there."))
    assert 0.5 < len(speech) / 16000 < 3 and np.abs(speech).max() > 0.1
    tone = media.read_audio(write_tone(tmp_path / "tone.wav", 0.25))
    silent = media.read_audio(write_tone(tmp_path / "silent.wav", 0.25, silent=True))
    assert len(tone) == len(silent) == 4000
    assert np.abs(tone).max() > 0.1 and not silent.any()

"""``retalk bench``: the reference-cost table computed from timing.json, the report's text, the JSON of a run."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from mediagen import write_face_clip, write_tone

from retalk.bench import NETWORK_CALLS, format_report, reference_costs
from retalk.cli import main
from retalk.errors import InputError

# Made-up per-call medians for three of the timed networks; every other network is absent (untimed).
TIMING = {
    "_environment": {"device": "cpu", "threads": 3, "torch": "9.9"},
    "S3FD": {"median_s": 0.5, "input_shapes": {"x": [1, 3, 64, 64]}},
    "ParseNet": {"median_s": 0.25, "input_shapes": {"x": [1, 3, 32, 32]}},
    "ENet": {"median_s": 2.0, "input_shapes": {"mel": [1, 1, 80, 16], "img": [1, 6, 40, 40]}},
}


@pytest.fixture
def timing_file(tmp_path):
    path = tmp_path / "timing.json"
    path.write_text(json.dumps(TIMING))
    return path


def _take(frames, stage_seconds, rss, hits=()):
    return {
        "frames": frames,
        "engine": "neural",
        "stage_seconds": stage_seconds,
        "cache_hits": list(hits),
        "peak_rss_mb": rss,
    }


def _results(reference):
    return {
        "video": "clip.mp4",
        "first": _take(4, {"track": 0.4, "render": 2.0}, 812.4),
        "second": _take(4, {"track": 0.004, "render": 1.0}, 640.2, ["track", "references"]),
        "short": _take(125, {}, 900.0),
        "long": _take(1500, {}, 910.0),
        "reference": reference,
    }


def test_reference_costs_multiply_calls_by_the_files_medians(timing_file):
    costs = reference_costs(timing_file)
    assert costs["found"] and costs["timing"] == str(timing_file)
    assert costs["environment"] == TIMING["_environment"]
    rows = {r["network"]: r for r in costs["networks"]}
    assert list(rows) == list(NETWORK_CALLS)
    expected_totals = {"reference": 0.0, "neural_first": 0.0, "neural_second": 0.0}
    for name, calls in NETWORK_CALLS.items():
        row = rows[name]
        assert row["reference_calls"] == calls.reference
        assert (row["neural_first_calls"], row["neural_second_calls"]) == (
            calls.neural_first,
            calls.neural_second,
        )
        if calls.timing in TIMING:
            median = TIMING[calls.timing]["median_s"]
            assert row["median_s"] == median
            assert row["reference_s_per_frame"] == pytest.approx(calls.reference * median)
            expected_totals["reference"] += calls.reference * median
            expected_totals["neural_first"] += calls.neural_first * median
            expected_totals["neural_second"] += calls.neural_second * median
        else:
            assert row["median_s"] is None and row["reference_s_per_frame"] is None
            assert name in costs["untimed"]
    assert costs["total_s_per_frame"] == pytest.approx(expected_totals)
    assert expected_totals["reference"] > 0  # the made-up file does price some of the table's networks
    assert rows["E-Net (its L-Net inside)"]["timed_input"] == "6x40x40"  # the largest input, batch dropped


def test_network_calls_never_exceed_the_reference_and_a_second_take_never_adds_calls():
    for name, calls in NETWORK_CALLS.items():
        assert 0 <= calls.neural_second <= calls.neural_first <= calls.reference, name
    # every network the engine runs is priced from a timing entry
    assert all(c.timing is not None for c in NETWORK_CALLS.values() if c.neural_first)


def test_report_prints_the_stage_table_with_rss_and_the_reference_table(timing_file):
    costs = reference_costs(timing_file)
    lines = format_report(_results(costs)).splitlines()
    render = next(line for line in lines if line.startswith("render")).split()
    assert [float(v) for v in render[1:]] == [500.0, 250.0]  # 2.0 s and 1.0 s over 4 frames
    total = next(line for line in lines if line.startswith("total ")).split()
    assert [float(v) for v in total[1:]] == [600.0, 251.0]
    assert next(line for line in lines if line.startswith("peak RSS ")).split()[2:] == [
        "812",
        "MB",
        "640",
        "MB",
    ]
    assert any("track, references" in line for line in lines)
    parse = next(line for line in lines if line.startswith("ParseNet")).split()
    calls = NETWORK_CALLS["ParseNet"]
    assert parse[-4:] == [
        "0.2500",
        f"{calls.reference * 0.25:.4f}",
        str(calls.neural_first),
        str(calls.neural_second),
    ]
    fan = next(line for line in lines if line.startswith("FAN"))
    assert fan.count("untimed") == 2
    totals = next(line for line in lines if line.startswith("total s/frame")).split()[2:]
    assert totals == [f"{v:.3f}" for v in costs["total_s_per_frame"].values()]
    header = next(line for line in lines if line.startswith("reference networks"))
    assert str(timing_file) in header and "cpu, 3 threads" in header and "torch 9.9" in header


def test_missing_timing_is_reported_not_tabled(tmp_path):
    path = tmp_path / "absent" / "timing.json"
    costs = reference_costs(path)
    assert costs == {"timing": str(path), "found": False}
    report = format_report(_results(costs))
    assert report.splitlines()[-1] == f"reference timing not found at {path}"
    assert "ParseNet" not in report


@pytest.mark.parametrize(
    "text", ["not json", '{"ENet": {"all_s": [1.0]}}', '{"ENet": {"median_s": "fast"}}', "[]"]
)
def test_malformed_timing_is_a_one_line_input_error(tmp_path, text):
    path = tmp_path / "timing.json"
    path.write_text(text)
    with pytest.raises(InputError, match="timing.json") as err:
        reference_costs(path)
    assert "\n" not in str(err.value)


def test_bench_with_a_missing_reference_timing_fails_before_any_take(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["bench", "--engine", "preview", "--reference-timing", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_bench_json_end_to_end(tmp_path, timing_file, capsys):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=8, size=(320, 240))
    audio = write_tone(tmp_path / "line.wav", 0.5)
    argv = [
        "bench",
        "--video",
        str(video),
        "--audio",
        str(audio),
        "--engine",
        "preview",
        "--codec",
        "lossless",
    ]
    sheet = tmp_path / "mouths.png"
    assert (
        main([*argv, "--long", "2", "--reference-timing", str(timing_file), "--json", "--sheet", str(sheet)])
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert results["video"] == str(video)
    assert results["first"]["frames"] == results["second"]["frames"] == 8  # the video's range
    assert results["short"]["frames"] == 13 and results["long"]["frames"] == 50  # 0.5 s and 2 s at 25 fps
    assert {"track", "render", "encode"} <= set(results["first"]["stage_seconds"])
    assert "track" in results["second"]["cache_hits"] and "track" not in results["first"]["cache_hits"]
    for take in ("first", "second", "short", "long"):
        assert results[take]["engine"] == "preview"
        assert results[take]["peak_rss_mb"] > 0
        assert all(s >= 0 for s in results[take]["stage_seconds"].values())
    assert results["reference"] == reference_costs(timing_file)

    # the contact sheet: 8 numbered columns of 128 px after a label column, source mouths above output mouths
    picture = cv2.imread(str(sheet))
    assert picture.shape == (24 + 2 * 128, 64 + 8 * 128, 3)
    source, output = picture[24:152, 64:], picture[152:, 64:]
    assert source.std() > 10 and output.std() > 10  # mouths, not blank cells
    assert np.abs(source.astype(int) - output).mean() > 1  # the re-dubbed mouths differ from the source's


def test_bench_long_zero_runs_the_two_takes_only(tmp_path, timing_file, capsys):
    video = write_face_clip(tmp_path / "shot.mp4", n_frames=4, size=(160, 120))
    audio = write_tone(tmp_path / "line.wav", 0.5)
    argv = ["bench", "--video", str(video), "--audio", str(audio), "--engine", "preview", "--long", "0"]
    assert main([*argv, "--reference-timing", str(timing_file), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {"first", "second"} <= results.keys() and not {"short", "long"} & results.keys()
    # the table, without the long take's lines
    assert main([*argv, "--reference-timing", str(timing_file)]) == 0
    report = capsys.readouterr().out
    assert "second take cache hits" in report and "output frames" not in report


def test_bench_refuses_a_sheet_it_cannot_write_before_any_take(tmp_path, capsys):
    for bad in (tmp_path / "absent" / "sheet.png", tmp_path / "sheet.jpg"):
        assert main(["bench", "--engine", "preview", "--sheet", str(bad)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0]

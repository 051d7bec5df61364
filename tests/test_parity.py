"""The neural engine against a recorded run of the reference pipeline (../shared/reference/pipeline): every network
input and output, image, mask and piece of geometry, stage by stage and chained end to end
(``retalk.selftest.pipeline``), and ``retalk selftest --pipeline`` on that recording and on altered copies of it.

One check runs per module (about 4 minutes of CPU on 2 cores); the command re-runs answer their network calls from
the check's recorded calls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from retalk.cli import main
from retalk.selftest.pipeline import BRIDGES, check_pipeline, format_report

pytestmark = pytest.mark.golden

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"


@pytest.fixture(scope="module")
def pipeline_dir(reference_dir: Path) -> Path:
    path = reference_dir / "pipeline"
    if not (path / "meta.json").is_file():
        pytest.skip(
            f"{path} is absent: these tests need the recorded reference run (../shared/reference/pipeline)"
        )
    return path


@pytest.fixture(scope="module")
def parity_checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parity-checkpoints")


@pytest.fixture(scope="module")
def report(pipeline_dir, parity_checkpoints):
    report = check_pipeline(pipeline_dir, parity_checkpoints, "cpu")
    print(format_report(report))
    return report


@pytest.fixture(scope="module")
def meta(pipeline_dir) -> dict:
    return json.loads((pipeline_dir / "meta.json").read_text())


def test_every_stage_matches_the_reference(report):
    failed = [f"{r.part} | {r.stage} | {r.call} | {r.detail}" for r in report.rows if not r.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("part", ["per stage", "chained"])
def test_every_network_call_is_checked(report, meta, part):
    """Each of the reference's network calls has its row in both passes (input, and output where recorded)."""
    checked = {m[1] for r in report.rows if r.part == part and (m := re.match(r"c(\d\d) ", r.call))}
    assert checked == {f"{c['index']:02d}" for c in meta["calls"]}


def test_what_depends_on_no_network_output_is_exact(report):
    """Geometry, crops and every network input built from a recorded image are bit-exact (float64 geometry
    within 1e-9 of its scale: the STIT coefficients come out of a matrix inverse)."""
    rows = [r for r in report.rows if r.part == "per stage"]
    geometry = [r for r in rows if r.stage.startswith("0")]
    assert len(geometry) == 17
    assert all(r.passed and r.detail.startswith(("exact", "geometry")) for r in geometry)
    assert all(r.output_error <= 1e-9 * 40 for r in geometry)
    inputs = [r for r in rows if re.match(r"c\d\d ", r.call) and "sha256" in r.detail]
    assert len(inputs) == 36  # every image-derived network input (the L-Net's is built inside E-Net)
    assert all(r.input_error == 0 for r in inputs)


def test_final_frames_match_in_the_face_region(report):
    """Face-region PSNR of the final frames against the reference's: high in the reference's blend area (the
    parity bridge); the engine's own area (deviation 6) is reported, and far from noise."""
    bridged, engine = report.psnr["chained, reference blend area"], report.psnr["chained, engine blend areas"]
    print(f"face-region PSNR: {bridged:.2f} dB (reference blend area), {engine:.2f} dB (engine blend areas)")
    assert bridged >= 45
    assert engine >= 20


def test_every_bridged_deviation_is_documented():
    design = DESIGN.read_text()
    for number in BRIDGES:
        assert re.search(rf"^## {number}\. ", design, re.MULTILINE), (
            f"docs/DESIGN.md has no deviation {number}"
        )


def test_the_command_passes_on_the_recording(report, pipeline_dir, parity_checkpoints, capsys):
    code = main(
        [
            "selftest",
            "--pipeline",
            str(pipeline_dir),
            "--keep",
            str(parity_checkpoints),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "c21 ENet" in out and "7e final paste" in out and "FAIL" not in out
    assert "face region PSNR" in out


def _altered_copy(pipeline_dir: Path, folder: Path, record: str, alter) -> Path:
    """The recording with one record changed by ``alter(array)`` (the other files linked)."""
    folder.mkdir()
    file, key = record.split(".")
    for other in pipeline_dir.iterdir():
        if other.name != f"{file}.npz":
            (folder / other.name).symlink_to(other)
    with np.load(pipeline_dir / f"{file}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays[key] = alter(arrays[key].copy())
    np.savez(folder / f"{file}.npz", **arrays)
    return folder


def _brighten_a_face_block(frames: np.ndarray) -> np.ndarray:
    frames[2, 400:416, 400:416] = np.clip(frames[2, 400:416, 400:416].astype(int) + 40, 0, 255)
    return frames


def _shift_one_box(boxes: np.ndarray) -> np.ndarray:
    boxes[3] += 1
    return boxes


@pytest.mark.parametrize(
    ("record", "alter", "stage"),
    [
        ("images.final_bgr", _brighten_a_face_block, "7e final paste"),
        ("geometry.boxes_smoothed_x1y1x2y2", _shift_one_box, "0-1 geometry"),
    ],
)
def test_the_command_names_the_stage_of_an_altered_record(
    report, pipeline_dir, parity_checkpoints, tmp_path, capsys, record, alter, stage
):
    copy = _altered_copy(pipeline_dir, tmp_path / "altered", record, alter)
    code = main(
        [
            "selftest",
            "--pipeline",
            str(copy),
            "--keep",
            str(parity_checkpoints),
            "--device",
            "cpu",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and not result["passed"]
    assert {r["stage"] for r in result["rows"] if not r["passed"]} == {stage}

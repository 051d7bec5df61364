"""The render farm (`retalk serve --ray`) on a real Ray cluster: every case of tests/farm_cases.py, run once in a
network namespace that has only loopback (so no Ray traffic can leave the machine) with a PID namespace of its
own (so every Ray process ends with the run), then reported here case by case."""

from __future__ import annotations

import os
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from farm_support import run_in_private_network

pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent
CASES = [  # in the order farm_cases.py runs them
    "test_every_node_is_on_loopback_in_a_namespace_with_no_other_interface",
    "test_a_split_preview_job_across_two_nodes_equals_the_one_process_render",
    "test_a_segment_of_a_killed_node_runs_again_elsewhere_and_the_job_completes_once",
    "test_cancel_stops_every_segment",
    "test_a_node_that_cannot_see_the_media_gives_the_clear_error",
    "test_a_split_neural_job_across_two_nodes_equals_the_one_process_render",
    "test_a_server_restarted_mid_job_resumes_from_its_journal",
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Case name -> (passed | failed | skipped, its report), from one run of tests/farm_cases.py."""
    pytest.importorskip("ray", reason="the render farm tests need Ray: pip install -e '.[ray]'")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("the render farm tests need root, unshare and ip for a private network namespace")
    report = tmp_path_factory.mktemp("farm") / "report.xml"
    command = [sys.executable, "-m", "pytest", str(TESTS / "farm_cases.py"), "-p", "no:cacheprovider"]
    run = run_in_private_network(
        [*command, f"--junitxml={report}", "-o", "junit_family=xunit1", "--durations=0", "-q"],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(run.stdout[-6000:], run.stderr[-3000:])
    if not report.exists():
        pytest.fail(
            f"the farm cases did not run (exit {run.returncode}): {run.stdout[-3000:]}{run.stderr[-3000:]}"
        )
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = (
            {"failure": "failed", "error": "failed", "skipped": "skipped"}.get(problem.tag, "")
            if problem is not None
            else "passed"
        )
        text = "" if problem is None else f"{problem.get('message', '')}\n{problem.text or ''}"
        results[case.get("name")] = (outcome, text)
    return results


@pytest.mark.parametrize("case", CASES)
def test_farm(outcomes, case):
    assert case in outcomes, f"{case} did not run; the farm run had: {sorted(outcomes)}"
    outcome, text = outcomes[case]
    if outcome == "skipped":
        pytest.skip(text.strip().splitlines()[0] if text.strip() else "skipped")
    assert outcome == "passed", text[-4000:]


def test_every_farm_case_is_reported(outcomes):
    assert sorted(outcomes) == sorted(CASES)

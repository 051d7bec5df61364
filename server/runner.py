"""The job runner a worker calls: a JobSpec in, ``retalk.pipeline.redub`` run, the result map out."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from retalk_server.spec import JobSpec

from retalk.pipeline import ProgressEvent, RedubRequest, RedubResult, redub


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_redub(
    spec: JobSpec, progress: Callable[[str, int, int, str], None], should_cancel: Callable[[], bool]
) -> dict:
    """Run one job (checked when it was submitted); the result map is what PROGRESS(done) carries and what
    RENDER/FETCH serve (§4.4)."""
    request = spec.request()

    def report(event: ProgressEvent) -> None:
        progress(event.stage, event.done, event.total, event.message)

    return result_map(request, redub(request, progress=report, should_cancel=should_cancel))


def result_map(request: RedubRequest, result: RedubResult) -> dict:
    """What PROGRESS(done) carries and RENDER/FETCH serve (§4.4), for a written ``result``."""
    return {
        "frames": result.frames,
        "rate": [result.rate.numerator, result.rate.denominator],
        "duration": [result.duration.numerator, result.duration.denominator],
        "engine": result.engine,
        "warnings": list(result.warnings),
        "codec": request.codec,
        "size": result.output.stat().st_size,
        "sha256": file_sha256(result.output),
    }

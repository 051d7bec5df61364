"""The job runner a worker calls: a journaled job spec in, ``retalk.pipeline.redub`` run, a result map out."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from retalk.pipeline import ProgressEvent, RedubRequest, RedubResult, redub

# SUBMIT options (PROTOCOL.md §4.3) that map one to one onto RedubRequest fields.
OPTION_FIELDS = ("expression", "upper_face", "fit", "extend", "face", "codec", "seed", "use_cache")


def request_from_spec(spec: dict) -> RedubRequest:
    """The RedubRequest a job spec describes (rationals travel as ``"num/den"`` strings in the journal)."""
    return RedubRequest(
        video=Path(spec["video"]),
        audio=Path(spec["audio"]),
        output=Path(spec["output"]),
        start=spec["start"],
        end=spec["end"],
        audio_offset=Fraction(spec["audio_offset"]),
        engine=spec["engine"],
        device=spec.get("device", "auto"),
        precision=spec.get("precision", "fp32"),
        **{name: spec["options"][name] for name in OPTION_FIELDS if name in spec["options"]},
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_redub(
    spec: dict, progress: Callable[[str, int, int, str], None], should_cancel: Callable[[], bool]
) -> dict:
    """Run one job; the result map is what PROGRESS(done) carries and what RENDER/FETCH serve (§4.4)."""
    request = request_from_spec(spec)
    request.validate()

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

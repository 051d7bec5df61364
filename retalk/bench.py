"""Re-dub measurements: time per frame of each stage, first take and second take (cached), and peak memory for
a short and a long output (memory must not grow with the length of the clip); next to it, what the reference
spends on networks per output frame (its per-call CPU timings times how often it calls each network); and a
contact sheet of source and output mouths. ``retalk bench`` and ``benchmarks/`` print these."""

from __future__ import annotations

import json
import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import soundfile

from retalk import media
from retalk.engines.mouths import LIPS, face_axes
from retalk.errors import InputError
from retalk.pipeline import RedubRequest, redub
from retalk.shared import shared_dir
from retalk.tracking import Tracker, track_faces


class NetworkCalls(NamedTuple):
    """Calls per output frame of one network (one face, as many output frames as video frames)."""

    timing: str | None  # its entry in timing.json; None: never timed
    runs_on: str  # the reference's input size (timing.json timed one size; other sizes cost differently)
    reference: int
    neural_first: int  # retalk's neural engine, first take
    neural_second: int  # second take: the video-only stages come from the cache


# The reference's dlib HOG detector runs on one frame per clip and GANimation only with --up_face, so
# neither is counted; retalk's face track (dlib, once per frame, cached) stands in for every detector
# below (docs/DESIGN.md, deviation 1).
NETWORK_CALLS: dict[str, NetworkCalls] = {
    # the detector inside both FAN landmark passes: face3d's landmarks, and the quad on the enhanced face
    "S3FD (face_alignment)": NetworkCalls("S3FD", "256x256", 2, 0, 0),
    "FAN 2DFAN-4": NetworkCalls(None, "256x256", 2, 0, 0),  # the same two landmark passes
    "S3FD (face_detect)": NetworkCalls("S3FD", "frame", 1, 0, 0),  # the E-Net face box
    # 5 points on the D-Net output (256) and on the blended frame
    "RetinaFace-R50 (GPEN)": NetworkCalls("RetinaFace-R50", "256, frame", 2, 0, 0),
    "RetinaFace-R50 (facexlib)": NetworkCalls("RetinaFace-R50", "frame", 1, 0, 0),  # 5 points for GFPGAN
    "face3d ResNet-50": NetworkCalls("face3d_recon", "224x224", 1, 1, 0),  # the 3DMM coefficients
    "D-Net": NetworkCalls("DNet", "256x256", 1, 1, 0),  # the stabilised expression
    "GPEN-BFR-512": NetworkCalls("GPEN-BFR-512", "512x512", 1, 1, 0),  # the enhanced reference
    # the reference's mask, the mouth mask and the face-parse blend; a second take redoes the last two
    "ParseNet": NetworkCalls("ParseNet", "512x512", 3, 3, 2),
    "E-Net (its L-Net inside)": NetworkCalls("ENet", "384x384", 1, 1, 1),  # the lips, timed with its L-Net
    "GFPGAN v1.3": NetworkCalls("GFPGANv1.3", "512x512", 1, 1, 1),  # the enhanced output face
}


def default_reference_timing() -> Path:
    """``$RETALK_SHARED/reference/timing.json`` (the shared verification data)."""
    return shared_dir() / "reference" / "timing.json"


def _largest_input(shapes: dict) -> str:
    """The biggest input a network was timed with, batch dropped (e.g. ``3x700x700``)."""
    shape = max(shapes.values(), key=lambda s: int(np.prod(s)), default=[])
    return "x".join(str(n) for n in shape[1:])


def reference_costs(timing_path: Path) -> dict:
    """The reference's network seconds per output frame from its per-call medians (timing.json) and
    :data:`NETWORK_CALLS`; ``{"timing": path, "found": False}`` when the file does not exist."""
    if not timing_path.is_file():
        return {"timing": str(timing_path), "found": False}
    try:
        timing = json.loads(timing_path.read_text())
        medians = {k: float(v["median_s"]) for k, v in timing.items() if not k.startswith("_")}
        inputs = {k: _largest_input(timing[k].get("input_shapes", {})) for k in medians}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"{timing_path}: not a timing.json with a median_s per network ({err})") from err
    rows = []
    for name, calls in NETWORK_CALLS.items():
        median = medians.get(calls.timing)
        rows.append(
            {
                "network": name,
                "runs_on": calls.runs_on,
                "timed_input": inputs.get(calls.timing, ""),
                "reference_calls": calls.reference,
                "median_s": median,
                "reference_s_per_frame": None if median is None else calls.reference * median,
                "neural_first_calls": calls.neural_first,
                "neural_second_calls": calls.neural_second,
            }
        )
    timed = [r for r in rows if r["median_s"] is not None]
    return {
        "timing": str(timing_path),
        "found": True,
        "environment": timing.get("_environment", {}),
        "networks": rows,
        "untimed": [r["network"] for r in rows if r["median_s"] is None],
        # the same per-call medians times each side's calls: what the call counts alone save
        "total_s_per_frame": {
            "reference": sum(r["reference_s_per_frame"] for r in timed),
            "neural_first": sum(r["neural_first_calls"] * r["median_s"] for r in timed),
            "neural_second": sum(r["neural_second_calls"] * r["median_s"] for r in timed),
        },
    }


def _take(request: RedubRequest) -> dict:
    """One re-dub in this (fresh) process: its stage times, frame count and the process's peak RSS."""
    result = redub(request)
    return {
        "frames": result.frames,
        "engine": result.engine,
        "stage_seconds": result.stage_seconds,
        "cache_hits": result.cache_hits,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }


def _in_fresh_process(request: RedubRequest) -> dict:
    """Peak RSS only means something per process: every take gets its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_take, request).result()


def write_mouth_sheet(source: Path, output: Path, start: int, sheet: Path, columns: int = 12) -> Path:
    """A PNG of ``columns`` evenly spaced output frames of a --fit video re-dub (numbered): the source frame's
    mouth in the upper row, the output frame's below, both cut at the box of the source's tracked mouth."""
    n = media.probe(output).frame_count
    picks = np.unique(np.linspace(0, n - 1, columns).round().astype(int))
    pairs = [
        (media.read_frames(source, start + i, start + i + 1)[0], media.read_frames(output, i, i + 1)[0])
        for i in picks
    ]
    # frames far apart: each detected on its own, nothing smoothed across them
    track = track_faces([src for src, _ in pairs], tracker=Tracker(key_interval=None, smooth_window=None))
    side, top, left = 128, 24, 64
    canvas = np.full((top + 2 * side, left + len(picks) * side, 3), 255, np.uint8)
    for row, name in enumerate(("source", "output")):
        cv2.putText(
            canvas, name, (4, top + row * side + side // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0)
        )
    for k, (pair, lm, found) in enumerate(zip(pairs, track.landmarks, track.found, strict=True)):
        x = left + k * side
        cv2.putText(canvas, str(picks[k]), (x + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0))
        if not found:
            continue
        scale = side / (1.5 * float(face_axes(lm)[2]))  # 1.5 eye distances across
        centre = lm[LIPS].mean(0)
        crop = np.float32(
            [[scale, 0, side / 2 - scale * centre[0]], [0, scale, side / 2 - scale * centre[1]]]
        )
        for row, frame in enumerate(pair):
            y = top + row * side
            canvas[y : y + side, x : x + side] = cv2.warpAffine(
                frame, crop, (side, side), flags=cv2.INTER_AREA
            )
    if not cv2.imwrite(str(sheet), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise InputError(f"--sheet {sheet}: could not write the PNG there")
    return sheet


def run_bench(
    video: Path,
    audio: Path,
    folder: Path,
    *,
    engine: str,
    codec: str,
    long_seconds: float | None,
    start: int = 0,
    end: int | None = None,
    checkpoints: Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    backend: str = "auto",
    sheet: Path | None = None,
) -> dict:
    """First and second take of ``video`` re-dubbed with ``audio``, each in a fresh process, all with one cache
    folder; with ``sheet``, a contact sheet of the second take's mouths (:func:`write_mouth_sheet`). Unless
    ``long_seconds`` is None, then a short take (--fit audio) and a take ``long_seconds`` long (the audio
    looped, the video looped to follow it)."""
    request = RedubRequest(
        video=video,
        audio=audio,
        output=folder / f"bench{media.default_extension(codec)}",
        start=start,
        end=end,
        engine=engine,
        checkpoints=checkpoints,
        device=device,
        precision=precision,
        backend=backend,
        codec=codec,
        cache_dir=folder / "cache",
    )
    results = {"video": str(video), "first": _in_fresh_process(request), "second": _in_fresh_process(request)}
    if sheet is not None:
        write_mouth_sheet(video, request.output, start, sheet)
    if long_seconds is None:
        return results
    wav = media.read_audio(audio, sample_rate=16000)
    repeats = int(np.ceil(long_seconds * 16000 / max(len(wav), 1)))
    long_audio = folder / "long.wav"
    soundfile.write(long_audio, np.tile(wav, repeats)[: round(long_seconds * 16000)], 16000)
    results["short"] = _in_fresh_process(replace(request, fit="audio"))
    results["long"] = _in_fresh_process(replace(request, audio=long_audio, fit="audio", extend="loop"))
    return results


def format_report(results: dict) -> str:
    first, second = results["first"], results["second"]
    stages = list(dict.fromkeys([*first["stage_seconds"], *second["stage_seconds"]]))
    lines = [
        f"{results['video']}: {first['frames']} frames, {first['engine']} engine",
        f"{'stage':<10}{'first take ms/frame':>22}{'second take ms/frame':>22}",
    ]
    for stage in stages:
        a, b = (take["stage_seconds"].get(stage, 0.0) * 1000 / take["frames"] for take in (first, second))
        lines.append(f"{stage:<10}{a:>22.2f}{b:>22.2f}")
    total = [sum(t["stage_seconds"].values()) * 1000 / t["frames"] for t in (first, second)]
    lines.append(f"{'total':<10}{total[0]:>22.2f}{total[1]:>22.2f}")
    lines.append(f"{'peak RSS':<10}{first['peak_rss_mb']:>19.0f} MB{second['peak_rss_mb']:>19.0f} MB")
    lines.append(f"second take cache hits: {', '.join(second['cache_hits']) or 'none'}")
    for take in (results[name] for name in ("short", "long") if name in results):
        lines.append(f"peak RSS, {take['frames']:>5} output frames: {take['peak_rss_mb']:.0f} MB")
    if "reference" in results:
        lines += ["", *_format_reference(results["reference"])]
    return "\n".join(lines)


def _format_reference(reference: dict) -> list[str]:
    if not reference["found"]:
        return [f"reference timing not found at {reference['timing']}"]
    env = reference["environment"]
    lines = [
        f"reference networks per output frame (timing: {reference['timing']}; {env.get('device', '?')}, "
        f"{env.get('threads', '?')} threads, batch 1, torch {env.get('torch', '?')})",
        f"{'network':<27}{'runs on':>11}{'timed input':>12}{'calls':>6}{'s/call':>9}{'s/frame':>9}"
        f"{'neural 1st':>11}{'neural 2nd':>11}",
    ]
    for row in reference["networks"]:
        timed = row["median_s"] is not None
        per_call = f"{row['median_s']:.4f}" if timed else "untimed"
        per_frame = f"{row['reference_s_per_frame']:.4f}" if timed else "untimed"
        lines.append(
            f"{row['network']:<27}{row['runs_on']:>11}{row['timed_input']:>12}{row['reference_calls']:>6}{per_call:>9}"
            f"{per_frame:>9}{row['neural_first_calls']:>11}{row['neural_second_calls']:>11}"
        )
    total = reference["total_s_per_frame"]
    lines.append(
        f"{'total s/frame':<27}{'':>11}{'':>12}{'':>6}{'':>9}{total['reference']:>9.3f}"
        f"{total['neural_first']:>11.3f}{total['neural_second']:>11.3f}"
    )
    lines.append(
        "neural columns: retalk's calls per frame; their total prices them at the reference's s/call"
    )
    if reference["untimed"]:
        lines.append(f"untimed, not in the totals: {', '.join(reference['untimed'])}")
    return lines

"""The engines that render a re-dub, and the contract between them and the pipeline (``retalk.pipeline.redub``).

``preview`` is weight-free and real time (landmark warps and the clip's own mouths); ``neural`` is the reference
system on the official checkpoints. The pipeline does everything that is the same for both: input checks, the
output timeline, face tracking, chunked decoding and encoding, faceless frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import numpy as np
from retalk_protocol.options import JOB_OPTIONS

from retalk import media
from retalk.cache import ArtifactCache
from retalk.tracking import FaceTrack


@dataclass
class SourceClip:
    """The video side of a job, as engines see it in ``prepare`` (everything here depends on the video only)."""

    path: Path
    info: media.VideoInfo
    start: int
    end: int
    content_key: str  # sha256 of what frames [start, end) decode from (media.hash_packets)
    track: FaceTrack  # of frames [start, end): row k is frame start + k
    cache: ArtifactCache | None
    device: str  # the request's auto|cpu|cuda[:N]: engines that use torch resolve it (retalk.device)


class Engine(Protocol):
    """A renderer. ``prepare`` does the video-only work (and may cache it in ``clip.cache`` under
    ``clip.content_key``; it returns the names of its cache hits), calling ``report(stage, done, total)`` as it
    goes (which raises CancelledError when the job is cancelled), ``listen`` the audio-only work (the new
    audio at 16 kHz, exactly as long as the output; it may return warnings for the job report),
    ``render_chunk`` the rest: ``frames`` (n, H, W, 3) uint8 RGB are clip frames ``source_index`` shown as
    output frames ``output_index``; it returns new frames. Frames without a face are put back untouched by
    the pipeline whatever the engine returns for them. ``ignores`` names the ``RedubRequest`` fields it does not
    honour: the pipeline warns when one of them is set away from its default. ``fast_encode``: the output is a
    draft, encoded for speed rather than size (``media.VideoWriter(fast=True)``)."""

    name: str
    ignores: tuple[str, ...]
    fast_encode: bool

    def prepare(self, clip: SourceClip, report: Callable[[str, int, int], None]) -> list[str]: ...

    def listen(self, wav16k: np.ndarray, rate: Fraction, n_frames: int) -> list[str]: ...

    def render_chunk(
        self, frames: np.ndarray, source_index: np.ndarray, output_index: np.ndarray
    ) -> np.ndarray: ...


def options_ignored_by(engine: str, *also: str) -> tuple[str, ...]:
    """The job options (PROTOCOL.md §4.3.1's table) that ``engine`` does not honour, and ``also``: the request's
    fields outside the job options (such as the workers' precision) that it ignores too."""
    return tuple(name for name, option in JOB_OPTIONS.items() if engine not in option.engines) + also

"""What a re-dub is asked to do, what it reports while it runs, and what it returns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from retalk_protocol.options import ENGINE, JOB_OPTIONS

from retalk.device import PRECISIONS
from retalk.errors import InputError

ENGINES = ENGINE.choices
CODECS = JOB_OPTIONS["codec"].choices  # the codecs of retalk.media


def _default(name: str):
    return JOB_OPTIONS[name].default


@dataclass
class RedubRequest:
    """A re-dub. The job options (``retalk_protocol.options.JOB_OPTIONS``: their meaning, choices and
    defaults) are fields of the same names; the rest is where the inputs are and where the work runs."""

    video: Path
    audio: Path
    output: Path
    start: int = 0  # first frame of the video range (inclusive)
    end: int | None = None  # end frame (exclusive); None = end of clip
    audio_offset: Fraction = Fraction(0)  # seconds into the audio file where the new line starts
    engine: str = ENGINE.default
    checkpoints: Path | None = None
    expression: str = _default("expression")
    upper_face: str = _default("upper_face")
    fit: str = _default("fit")
    extend: str = _default("extend")
    face: str = _default("face")
    detector: str = _default("detector")
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only): the networks' arithmetic (device.autocast)
    codec: str = _default("codec")
    seed: int = _default("seed")
    backend: str = _default("backend")
    cache_dir: Path | None = None  # default: platformdirs user cache / "retalk"
    use_cache: bool = _default("use_cache")

    def __post_init__(self) -> None:
        self.video, self.audio, self.output = Path(self.video), Path(self.audio), Path(self.output)
        if self.checkpoints is not None:
            self.checkpoints = Path(self.checkpoints)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)

    def validate(self) -> None:
        """Raise InputError with one clear line for anything wrong that can be seen without opening files."""

        for option in (ENGINE, *JOB_OPTIONS.values()):
            value = getattr(self, option.name)
            problem = option.problem(value)
            if problem is not None:
                raise InputError(f"{option.flag} {value!r}: {problem}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not isinstance(self.start, int) or self.start < 0:
            raise InputError(f"--start {self.start!r}: expected a frame index >= 0")
        if self.end is not None and (not isinstance(self.end, int) or self.end <= self.start):
            raise InputError(
                f"--end {self.end!r}: expected a frame index greater than --start ({self.start})"
            )
        try:
            offset = Fraction(self.audio_offset)
        except (TypeError, ValueError):
            raise InputError(f"--audio-offset {self.audio_offset!r}: expected seconds, e.g. 1.5") from None
        if offset < 0:
            raise InputError(f"--audio-offset {float(offset)}: expected seconds >= 0")
        self.audio_offset = offset
        expressions = JOB_OPTIONS["expression"].choices
        if self.expression not in expressions and not Path(self.expression).is_file():
            raise InputError(
                f"--expression {self.expression!r}: expected {', '.join(expressions)} or the path of an existing image"
            )
        for name, path in (("video", self.video), ("audio", self.audio)):
            if not path.is_file():
                raise InputError(f"--{name} {path}: no such file")
        if self.output.resolve() in (self.video.resolve(), self.audio.resolve()):
            raise InputError(
                f"-o {self.output}: the output would overwrite an input; choose another file name"
            )
        if not self.output.parent.is_dir():
            raise InputError(f"-o {self.output}: folder {self.output.parent} does not exist")

    def frame_range(self, frame_count: int) -> tuple[int, int]:
        """The range [start, end) this request re-dubs in a clip of ``frame_count`` frames; InputError when it
        does not lie inside the clip."""
        end = frame_count if self.end is None else self.end
        if not 0 <= self.start < end <= frame_count:
            raise InputError(
                f"--start {self.start} --end {end}: outside the clip's {frame_count} frames "
                f"(valid: 0 <= start < end <= {frame_count})"
            )
        return self.start, end


@dataclass
class ProgressEvent:
    stage: str
    done: int
    total: int
    message: str = ""


@dataclass
class RedubResult:
    output: Path
    frames: int
    rate: Fraction
    duration: Fraction
    engine: str
    faceless_ranges: list[tuple[int, int]]  # output-frame ranges passed through untouched (no face)
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cache_hits: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """A JSON-ready dict: paths as strings, rates and durations as ``"num/den"`` strings (exact)."""
        return {
            "output": str(self.output),
            "frames": self.frames,
            "rate": str(self.rate),
            "duration": str(self.duration),
            "engine": self.engine,
            "faceless_ranges": [list(r) for r in self.faceless_ranges],
            "warnings": list(self.warnings),
            "stage_seconds": dict(self.stage_seconds),
            "cache_hits": list(self.cache_hits),
        }

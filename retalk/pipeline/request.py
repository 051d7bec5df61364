"""What a re-dub is asked to do, what it reports while it runs, and what it returns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from retalk import media
from retalk.device import PRECISIONS
from retalk.errors import InputError
from retalk.pipeline.timing import EXTEND_MODES, FIT_MODES

ENGINES = ("auto", "neural", "preview")
UPPER_FACE = ("none", "sad", "angry", "surprise")
EXPRESSIONS = ("neutral", "smile")
# the neural engine's face detector; auto: the reference's S3FD and FAN when present, else dlib
DETECTORS = ("auto", "reference", "dlib")
CODECS = tuple(media.CODECS)  # h264 | prores | prores4444 | lossless


@dataclass
class RedubRequest:
    video: Path
    audio: Path
    output: Path
    start: int = 0  # first frame of the video range (inclusive)
    end: int | None = None  # end frame (exclusive); None = end of clip
    audio_offset: Fraction = Fraction(0)  # seconds into the audio file where the new line starts
    engine: str = "auto"  # auto | neural | preview
    checkpoints: Path | None = None
    expression: str = "neutral"  # neutral | smile | path to an image
    upper_face: str = "none"  # none | sad | angry | surprise
    fit: str = "video"  # video: exactly the video range; audio: follow the audio, extending the video
    extend: str = "loop"  # loop | pingpong | hold (fit=audio with a longer audio)
    face: str = "largest"  # largest | INDEX | X,Y
    detector: str = (
        "auto"  # auto | reference (S3FD boxes, FAN points) | dlib: the neural engine's (DETECTORS)
    )
    device: str = "auto"
    precision: str = (
        "fp32"  # fp32 | bf16 | fp16 (CUDA only): the networks' arithmetic (retalk.device.autocast)
    )
    codec: str = "h264"
    seed: int = 0
    cache_dir: Path | None = None  # default: platformdirs user cache / "retalk"
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.video, self.audio, self.output = Path(self.video), Path(self.audio), Path(self.output)
        if self.checkpoints is not None:
            self.checkpoints = Path(self.checkpoints)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)

    def validate(self) -> None:
        """Raise InputError with one clear line for anything wrong that can be seen without opening files."""

        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise InputError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")

        choice("engine", self.engine, ENGINES)
        choice("upper-face", self.upper_face, UPPER_FACE)
        choice("fit", self.fit, FIT_MODES)
        choice("extend", self.extend, EXTEND_MODES)
        choice("codec", self.codec, CODECS)
        choice("detector", self.detector, DETECTORS)
        choice("precision", self.precision, PRECISIONS)
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
        if self.expression not in EXPRESSIONS and not Path(self.expression).is_file():
            raise InputError(
                f"--expression {self.expression!r}: expected neutral, smile or the path of an existing image"
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

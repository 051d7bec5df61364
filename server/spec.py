"""The job spec: what one job renders, as the server journals it (PROTOCOL.md §8.1), queues it and a worker runs
it. The app builds it from a SUBMIT, the journal stores it as JSON, worker pools carry it (it pickles), the
runner turns it into the pipeline's RedubRequest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from retalk_protocol import options as job_options

from retalk.pipeline.request import RedubRequest


@dataclass(frozen=True)
class JobSpec:
    video: Path
    audio: Path
    output: Path  # the result file, in the job's own folder
    start: int = 0  # first frame of the clip (inclusive)
    end: int | None = None  # end frame (exclusive); None = the end of the clip
    audio_offset: Fraction = Fraction(0)  # seconds into the audio where the new line starts
    engine: str = job_options.ENGINE.default
    options: dict = field(default_factory=job_options.defaults)  # every job option (§4.3.1), by name
    # Where it runs: chosen by the worker that takes the job (the journal keeps these defaults).
    device: str = "auto"
    precision: str = "fp32"

    @property
    def folder(self) -> Path:
        """The job's own folder: its result and the uploaded media it consumed."""
        return self.output.parent

    def inputs(self) -> set[Path]:
        """The files of the job's folder it reads (uploads moved there); anything else there is output."""
        return {path for path in (self.video, self.audio) if path.parent == self.folder}

    def on(self, device: str, precision: str) -> JobSpec:
        """This job placed on a worker's device, at its precision."""
        return dataclasses.replace(self, device=device, precision=precision)

    def request(self) -> RedubRequest:
        """The pipeline's request for this job."""
        return RedubRequest(
            video=self.video,
            audio=self.audio,
            output=self.output,
            start=self.start,
            end=self.end,
            audio_offset=self.audio_offset,
            engine=self.engine,
            device=self.device,
            precision=self.precision,
            **self.options,
        )

    def to_json(self) -> dict:
        """A JSON-ready dict for the journal (paths as strings, the offset as ``"num/den"``)."""
        return {
            "video": str(self.video),
            "audio": str(self.audio),
            "output": str(self.output),
            "start": self.start,
            "end": self.end,
            "audio_offset": str(self.audio_offset),
            "engine": self.engine,
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, data: dict) -> JobSpec:
        """A journaled spec; options a journal from an older server lacks take their defaults."""
        return cls(
            video=Path(data["video"]),
            audio=Path(data["audio"]),
            output=Path(data["output"]),
            start=data["start"],
            end=data["end"],
            audio_offset=Fraction(data["audio_offset"]),
            engine=data["engine"],
            options=job_options.complete(data["options"]),
        )

"""Progress reporters for :class:`~retalk.pipeline.ProgressEvent` streams: tqdm bars or JSON lines."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from tqdm import tqdm

from retalk.pipeline.request import ProgressEvent


class StageBars:
    """One tqdm bar per stage (on stderr): a new bar opens when the stage changes, the old one closes."""

    def __init__(self, file: TextIO | None = None, disable: bool | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self._stage: str | None = None
        self._bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(
                total=event.total, desc=event.stage, unit="f", file=self.file, disable=self.disable
            )
        bar = self._bar
        if bar.total != event.total:
            bar.total = event.total
        bar.update(event.done - bar.n)
        if event.message:
            bar.set_postfix_str(event.message, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


class JsonLines:
    """One JSON object per event on ``stream``: ``{"event": "progress", "stage", "done", "total", "message"}``."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, event: ProgressEvent) -> None:
        self.write({"event": "progress", **vars(event)})

    def write(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

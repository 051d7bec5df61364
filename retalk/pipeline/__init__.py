"""The re-dub pipeline: requests, the stages that serve them, and the engines that render."""

from retalk.pipeline.redub import Engine, redub
from retalk.pipeline.request import ProgressEvent, RedubRequest, RedubResult

__all__ = ["Engine", "ProgressEvent", "RedubRequest", "RedubResult", "redub"]

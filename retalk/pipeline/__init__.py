"""The re-dub pipeline: requests and the stages that serve them (the engines that render are ``retalk.engines``)."""

from retalk.pipeline.redub import redub
from retalk.pipeline.request import ProgressEvent, RedubRequest, RedubResult

__all__ = ["ProgressEvent", "RedubRequest", "RedubResult", "redub"]

"""retalk: audio-driven lip-sync editing of real talking-head video."""

__version__ = "0.1.0"

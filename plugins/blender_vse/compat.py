"""The sequencer API across Blender versions, in one place.

- 4.2-4.3: ``SequenceEditor.sequences``/``sequences_all``; 4.4-4.5 add ``strips``/``strips_all`` (the new
  names); 5.0 removes ``sequences``.
- 5.2: ``left_handle``/``right_handle``/``content_start``/``content_trim_start`` replace the deprecated
  ``frame_final_start``/``frame_final_end``/``frame_start``/``animation_offset_start``.
"""

from __future__ import annotations

from fractions import Fraction

_NTSC_DENOMINATOR = 1001  # largest denominator among real frame rates (30000/1001 ...)


def top_strips(editor):
    """The top-level strip collection (the one with ``new_movie``/``new_sound``)."""
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def all_strips(editor):
    return editor.strips_all if hasattr(editor, "strips_all") else editor.sequences_all


def left_handle(strip) -> int:
    """First timeline frame the strip shows."""
    return strip.left_handle if hasattr(strip, "left_handle") else strip.frame_final_start


def right_handle(strip) -> int:
    """First timeline frame after the strip (exclusive end)."""
    return strip.right_handle if hasattr(strip, "right_handle") else strip.frame_final_end


def set_right_handle(strip, frame: int) -> None:
    if hasattr(strip, "right_handle"):
        strip.right_handle = frame
    else:
        strip.frame_final_end = frame


def content_start(strip) -> float:
    """Timeline frame where the strip's source begins (before its left handle trims it)."""
    return strip.content_start if hasattr(strip, "content_start") else strip.frame_start


def hard_trim(strip) -> int:
    """Source frames cut off before the strip's content begins ("Trim Duration (hard)")."""
    if hasattr(strip, "content_trim_start"):
        return strip.content_trim_start
    return strip.animation_offset_start


def exact_rate(value: float) -> Fraction:
    """A frame rate Blender stores as a float, back as the exact rational it stands for (30000/1001, 1350/61)."""
    return Fraction(value).limit_denominator(_NTSC_DENOMINATOR)


def scene_rate(scene) -> Fraction:
    return Fraction(scene.render.fps) / exact_rate(scene.render.fps_base)

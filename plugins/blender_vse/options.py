"""Option values the add-on offers; they mirror the `retalk redub` CLI (retalk.pipeline) and carry no bpy."""

ENGINES = ("auto", "preview", "neural")
EXPRESSIONS = ("neutral", "smile")
UPPER_FACE = ("none", "sad", "angry", "surprise")
FIT_MODES = ("video", "audio")
EXTEND_MODES = ("loop", "pingpong", "hold")
CODECS = ("h264", "prores", "prores4444", "lossless")
DEFAULT_SERVER = "tcp://127.0.0.1:7878"
RESULT_FOLDER = "//retalk/"  # beside the .blend


def enum_items(values, descriptions=None):
    """bpy EnumProperty items for plain string values."""
    descriptions = descriptions or {}
    return [(value, value.capitalize(), descriptions.get(value, "")) for value in values]

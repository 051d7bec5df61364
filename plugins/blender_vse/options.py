"""What the add-on offers, without bpy: the job options come from the one table (retalk_protocol.options, a
bundled wheel), the rest is the add-on's own."""

from retalk_protocol.options import ENGINE, JOB_OPTIONS

# The operator's fields: the engine, then every job option, in the table's order.
FIELDS = (ENGINE, *JOB_OPTIONS.values())
DEFAULT_SERVER = "tcp://127.0.0.1:7878"
RESULT_FOLDER = "//retalk/"  # beside the .blend


def label(option) -> str:
    """The field's label: ``upper_face`` -> "Upper face"."""
    return option.name.replace("_", " ").capitalize()


def enum_items(values):
    """bpy EnumProperty items for plain string values."""
    return [(value, value.capitalize(), "") for value in values]


def honoured(option, engine: str) -> bool:
    """Whether ``engine`` uses the option (auto may turn out to be either engine)."""
    return engine == "auto" or engine in option.engines


def submitted_value(option, value):
    """A field's value as the job gets it: free text trimmed, an empty one meaning the default."""
    if option.type is str and not option.choices:
        return value.strip() or option.default
    return value

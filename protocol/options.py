"""The job options (PROTOCOL.md §4.3.1): the one table the `retalk redub` and `retalk submit` parsers, the
server's checks, the job runner (a ``RedubRequest`` field per option) and the plug-ins' fields are built from.

Pure Python, valid on Python 3.8, no third-party imports: host applications import it. Adding an option is one
row in ``JOB_OPTIONS`` plus the engine code that honours it (its ``RedubRequest`` field takes the default from
here).
"""

from __future__ import annotations

ENGINE_NAMES = ("auto", "neural", "preview")
_EVERY_ENGINE = ("neural", "preview")
_TYPE_NAMES = {str: "str", int: "int", bool: "bool"}


class Option:
    """One job option.

    ``name`` is the key in SUBMIT's ``options`` map and the ``RedubRequest`` field; ``choices`` the named
    values (empty: any value of the type); ``path``: a value outside the choices names a file, which a server
    confines to its media roots (§6.2); ``engines`` the engines that honour it (the others ignore it);
    ``flag`` the command-line flag (a bool whose default is true is turned off by it).
    """

    __slots__ = ("name", "type", "default", "help", "choices", "path", "engines", "flag")

    def __init__(
        self,
        name: str,
        type: type,
        default,
        help: str,
        *,
        choices: tuple = (),
        path: bool = False,
        engines: tuple = _EVERY_ENGINE,
        flag: str | None = None,
    ):
        self.name = name
        self.type = type
        self.default = default
        self.help = help
        self.choices = tuple(choices)
        self.path = path
        self.engines = tuple(engines)
        self.flag = flag or "--" + name.replace("_", "-")

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.type]

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` for this option, in words (one line); None when it is acceptable."""
        if type(value) is not self.type:  # exact: a bool is not an int, an int is not a bool
            return f"expected {self.type_name}, got {type(value).__name__}"
        if self.choices and not self.path and value not in self.choices:
            return "expected one of " + ", ".join(self.choices)
        return None

    def describe(self) -> dict:
        """The option as a msgpack/JSON map (WELCOME's ``options``, §4.1)."""
        return {
            "name": self.name,
            "type": self.type_name,
            "default": self.default,
            "choices": list(self.choices),
            "path": self.path,
            "engines": list(self.engines),
            "help": self.help,
        }

    def __repr__(self) -> str:
        return f"Option({self.name!r}, {self.type_name}, default={self.default!r})"


# The engine is SUBMIT's own `engine` field, not an entry of `options`; it is described the same way.
ENGINE = Option(
    "engine",
    str,
    "auto",
    "the renderer: neural (the VideoReTalking networks), preview (weight-free), or auto (neural when its "
    "checkpoints are present)",
    choices=ENGINE_NAMES,
)

JOB_OPTIONS = {
    option.name: option
    for option in (
        Option(
            "expression",
            str,
            "neutral",
            "the expression the face is stabilised to: neutral, smile, or the path of an image of a face",
            choices=("neutral", "smile"),
            path=True,
            engines=("neural",),
        ),
        Option(
            "upper_face",
            str,
            "none",
            "an expression for the upper face (brows, eyes), or none to keep the shot's",
            choices=("none", "sad", "angry", "surprise"),
            engines=("neural",),
        ),
        Option(
            "fit",
            str,
            "video",
            "video: keep the frame range, padding or trimming the audio; audio: follow the audio, "
            "extending the video",
            choices=("video", "audio"),
        ),
        Option(
            "extend",
            str,
            "loop",
            "how the video is extended when fit is audio and the audio is longer",
            choices=("loop", "pingpong", "hold"),
        ),
        Option(
            "face",
            str,
            "largest",
            "the face to re-dub: largest, INDEX (left to right) or X,Y (a point on it)",
        ),
        Option(
            "detector",
            str,
            "auto",
            "face detector for the neural engine: the reference's S3FD+FAN when their files are present "
            "(auto), or dlib",
            choices=("auto", "reference", "dlib"),
            engines=("neural",),
        ),
        Option(
            "codec",
            str,
            "h264",
            "the result's codec: h264 (.mp4), prores or prores4444 (.mov), lossless (FFV1, .mkv)",
            choices=("h264", "prores", "prores4444", "lossless"),
        ),
        Option(
            "seed",
            int,
            0,
            "seed of the networks' random noise: the same seed renders the same frames",
            engines=("neural",),
        ),
        Option(
            "backend",
            str,
            "auto",
            "where the networks run on the CPU: openvino (faster, fp32), torch, or auto (openvino on the CPU "
            "when it is installed, torch on CUDA)",
            choices=("auto", "torch", "openvino"),
            engines=("neural",),
        ),
        Option(
            "use_cache",
            bool,
            True,
            "use the cache of the video-only stages (a second take of the same frames skips them)",
            flag="--no-cache",
        ),
    )
}


def defaults() -> dict:
    """Every job option at its default."""
    return {name: option.default for name, option in JOB_OPTIONS.items()}


def complete(values: dict) -> dict:
    """``values`` (SUBMIT's ``options``) with the defaults of the options left out; ValueError (one line) on a
    name this table does not know. Values are checked by ``Option.problem``."""
    unknown = [name for name in values if name not in JOB_OPTIONS]
    if unknown:
        raise ValueError(
            f"unknown option {str(unknown[0])[:32]!r}; known: {', '.join(JOB_OPTIONS)} (PROTOCOL.md §4.3.1)"
        )
    return dict(defaults(), **values)


def add_arguments(parser) -> None:
    """``--engine`` and one flag per job option on an ``argparse`` parser; ``from_arguments`` reads them."""
    for option in (ENGINE, *JOB_OPTIONS.values()):
        text = option.help
        if option.engines != _EVERY_ENGINE:
            text += f" [{', '.join(option.engines)} engine only]"
        if option.type is bool:  # the flag turns the default over
            action = "store_false" if option.default else "store_true"
            parser.add_argument(
                option.flag,
                dest=option.name,
                action=action,
                help=("do not " if option.default else "") + text,
            )
            continue
        closed = bool(option.choices) and not option.path
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.type,
            default=option.default,
            choices=option.choices if closed else None,
            help=f"{text} (default: {option.default})",
        )


def from_arguments(args) -> dict:
    """The job options of parsed arguments (``add_arguments``), as SUBMIT's ``options`` map."""
    return {name: getattr(args, name) for name in JOB_OPTIONS}

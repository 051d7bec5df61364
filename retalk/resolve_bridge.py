"""The Resolve bridge: the retalk side of the DaVinci Resolve menu entries (plugins/davinci/).

The entries (``Re-dub with retalk.lua`` and ``.py``) run inside Resolve, where retalk does not import. Each reads
what it needs from Resolve and starts this module with retalk's interpreter::

    RETALK_PYTHON -m retalk.resolve_bridge REQUEST.json

then reads JSON-line events from its standard output. Everything that is not a Resolve call happens here: the
frame arithmetic, the dialog (retalk's own Tk window, or the console where no display is available), the job on
the retalk server (protocol, progress, Cancel, fetching the result) and the wording of every message. The
message format is written down in protocol/RESOLVE_BRIDGE.md; section numbers below refer to it.

Module-level imports stay light: the bridge starts twice per re-dub, and the dialog should appear at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from retalk_protocol.options import ENGINE, JOB_OPTIONS

from retalk.errors import InputError, MediaError, RetalkError

FORMAT_VERSION = 1  # the "bridge" field of a request (§2.2)
DEFAULT_SERVER = "tcp://127.0.0.1:7878"
CONNECT_TIMEOUT = 10.0  # seconds to wait for the server's WELCOME
TRANSFER_TIMEOUT = 120.0  # seconds a reply may take once connected: uploads and fetches of large files
# Resolve shows the clip rate rounded to 3 decimals (22.131 for 1350/61): anything further off is another rate.
RATE_TOLERANCE = Fraction(1, 1000)
# Resolve shows NTSC-family rates rounded; these are the exact rates behind the strings.
NTSC_RATES = {
    "23.976": Fraction(24000, 1001),
    "29.97": Fraction(30000, 1001),
    "47.952": Fraction(48000, 1001),
    "59.94": Fraction(60000, 1001),
    "119.88": Fraction(120000, 1001),
}


# -- the options the dialog offers ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DialogOption:
    name: str  # the SUBMIT option (PROTOCOL.md §4.3.1), or "engine"
    label: str
    choices: tuple[str, ...] | None  # None: free text
    default: str


def _offered(option, choices: tuple[str, ...] | None = None, default: str | None = None) -> DialogOption:
    """A row of the job options table (retalk_protocol.options) as the dialog offers it."""
    return DialogOption(
        option.name,
        option.name.replace("_", " ").capitalize(),
        choices if choices is not None else option.choices or None,
        option.default if default is None else default,
    )


RESOLVE_CODECS = ("prores", "h264", "prores4444")  # what Resolve imports on every OS; the server writes more
DIALOG_OPTIONS = (
    _offered(ENGINE),
    _offered(JOB_OPTIONS["expression"]),  # its named choices: an image path is for the command line
    _offered(JOB_OPTIONS["face"]),
    _offered(JOB_OPTIONS["codec"], choices=RESOLVE_CODECS, default="prores"),
)
FIXED_OPTIONS = {"fit": "video"}  # a take must be exactly as long as the shot


def checked_options(saved: dict | None) -> dict:
    """The dialog's options from ``saved`` (e.g. a settings file), each an allowed value or its default."""
    saved = saved if isinstance(saved, dict) else {}
    options = {}
    for option in DIALOG_OPTIONS:
        value = saved.get(option.name)
        valid = isinstance(value, str) and value and (option.choices is None or value in option.choices)
        options[option.name] = value if valid else option.default
    return options


# -- settings (§6) ---------------------------------------------------------------------------------------------
def settings_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("retalk")) / "resolve.json"


@dataclasses.dataclass
class Settings:
    """What `retalk resolve install` wrote, the dialog's last choices, and the last Resolve an entry ran in."""

    server: str = DEFAULT_SERVER
    keys: dict | None = None  # {"server": the server's public *.key, "client": this client's *.key_secret}
    connect_timeout: float = CONNECT_TIMEOUT
    options: dict = dataclasses.field(default_factory=lambda: checked_options(None))
    resolve: dict | None = None  # {"entry": "lua"|"python", "product": str, "version": [major, minor, ...]}

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        path = path or settings_path()
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as err:
            raise RetalkError(f"{path} is unreadable ({err}); run `retalk resolve install` again") from None
        if not isinstance(saved, dict):
            raise RetalkError(f"{path} is damaged; run `retalk resolve install` again")
        settings = cls()
        for field in dataclasses.fields(cls):
            if field.name in saved:
                setattr(settings, field.name, saved[field.name])
        settings.options = checked_options(settings.options)
        return settings

    def save(self, path: Path | None = None) -> Path:
        path = path or settings_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(partial, path)
        return path

    def remember(self) -> None:
        """Save what the bridge learnt (the last choices, the Resolve it ran in), where the folder is writable:
        a convenience, never a reason for the re-dub to fail."""
        try:
            self.save()
        except OSError:
            pass


# -- the shot, from what the entry read in Resolve (§3.1) ---------------------------------------------------
def parse_rate(text) -> Fraction:
    """A Resolve frame-rate string ("25", "29.97", "29.97 DF", "23.976") as an exact Fraction."""
    words = str(text or "").split()  # "29.97 DF": the drop-frame flag does not change the rate
    value = words[0] if words else ""
    if not value:
        raise InputError("Resolve reported no frame rate for the clip or timeline")
    if value in NTSC_RATES:
        return NTSC_RATES[value]
    try:
        rate = Fraction(value)
    except ValueError:
        raise InputError(f"Resolve reported the frame rate {text!r}, which is not a number") from None
    if rate <= 0:
        raise InputError(f"Resolve reported the frame rate {text!r}")
    return rate


@dataclasses.dataclass
class Shot:
    """The timeline item to re-dub: its source file, the source frames [start, end) it plays, its rates."""

    clip: str
    path: str
    fps: str
    rate: Fraction
    timeline_rate: Fraction
    record_start: int
    start: int
    end: int
    take: int  # the number the new take will get

    @classmethod
    def from_facts(cls, facts: dict) -> Shot:
        clip = facts["clip"]
        if facts.get("path") is None:
            raise InputError(f"The clip '{clip}' has no source media (a title or generator?)")
        path = facts["path"]
        if not path or not os.path.isfile(path):
            raise InputError(f"The source file of '{clip}' is not available here: {path!r}")
        rate, timeline_rate = parse_rate(facts.get("fps")), parse_rate(facts.get("timeline_fps"))
        record_start, duration = facts.get("record_start"), facts.get("record_duration")
        if record_start is None or not duration:
            raise InputError(f"Resolve did not report where '{clip}' sits on the timeline")
        if facts.get("source_start") is not None and facts.get("source_end") is not None:  # Resolve 19.1+
            start, end = int(facts["source_start"]), int(facts["source_end"])
        elif facts.get("left_offset") is not None:
            # Older Resolve: the left offset counts source frames; the duration counts timeline frames.
            start = int(facts["left_offset"])
            end = start + round(Fraction(int(duration)) * rate / timeline_rate)
        else:
            raise InputError(f"Resolve did not report the source range of '{clip}'")
        if end <= start:
            raise InputError(f"The clip '{clip}' uses no source frames")
        take = max(int(facts.get("takes") or 0), 1) + 1  # the original is take 1 once a take selector exists
        return cls(clip, path, str(facts["fps"]), rate, timeline_rate, int(record_start), start, end, take)

    def output_stem(self) -> str:
        """Where the result goes, without extension: a retalk folder beside the source, named after the take."""
        folder, name = os.path.split(self.path)
        return os.path.join(folder, "retalk", f"{os.path.splitext(name)[0]}_take{self.take}")


@dataclasses.dataclass
class AudioClip:
    """An audio timeline item under the shot's first frame, and the second of its file playing there."""

    track: int
    track_name: str
    clip: str
    path: str
    offset: Fraction

    @classmethod
    def from_facts(cls, facts: dict, shot: Shot) -> AudioClip:
        clip = facts["clip"]
        if not facts.get("path"):
            raise InputError(f"The audio clip '{clip}' has no source file")
        if facts.get("source_start") is not None:  # counted in the audio clip's own rate
            head = Fraction(int(facts["source_start"])) / parse_rate(facts.get("fps"))
        else:  # older Resolve: the left offset counts timeline frames on an audio item
            head = Fraction(int(facts.get("left_offset") or 0)) / shot.timeline_rate
        offset = head + Fraction(shot.record_start - int(facts["record_start"])) / shot.timeline_rate
        if offset < 0:
            raise InputError(
                f"The audio clip '{clip}' starts after the shot; move it to cover the shot's first frame"
            )
        track = int(facts["track"])
        return cls(track, facts.get("track_name") or f"A{track}", clip, facts["path"], offset)

    def describe(self) -> str:
        return f"{self.track_name}: {self.clip}"


@dataclasses.dataclass
class Choice:
    """What the editor chose in the dialog: an audio clip under the shot or a file, and the options."""

    options: dict
    audio_clip: AudioClip | None = None
    audio_file: str | None = None

    def audio(self) -> tuple[str, Fraction]:
        """The replacement audio file and the second in it where the new line starts."""
        if self.audio_clip is not None:
            return self.audio_clip.path, self.audio_clip.offset
        path = self.audio_file or ""
        if not os.path.isfile(path):
            raise InputError(f"The replacement audio file does not exist: {path!r}")
        return path, Fraction(0)


# -- messages the entries report (§3.2) --------------------------------------------------------------------------
REPORTS = {
    # the entry found nothing to re-dub
    "no-project": "Open a project first",
    "no-timeline": "Open a timeline on the Edit page first",
    "no-media-pool": "Resolve did not give access to the media pool",
    "no-clip": "No clip to re-dub: select a video clip on the Edit page, or park the playhead on one",
    "several-selected": "{count} video clips are selected; select just the one to re-dub",
    # where the result went
    "take": "Added the re-dub as take {take} of '{clip}'.",
    "take-not-selected": "Added the re-dub as take {take}, but Resolve did not select it: pick it in the take selector",
    "take-unlisted": "Resolve accepted the take but does not list it; the re-dub is in the 'retalk' bin",
    "above": "Resolve refused the take; the re-dub is on V{track} above '{clip}' at the same frame.",
    "bin": "Resolve refused the take; the re-dub is in the 'retalk' bin: {file}",
    "no-bin": "Resolve could not make the 'retalk' bin in the media pool; the re-dub is at {path}",
    "bin-not-opened": "Resolve could not open the 'retalk' bin; the re-dub is at {path}",
    "import-failed": "Resolve could not import the re-dub; it is at {path}",
}
CANCELLED_TEXT = "Re-dub cancelled; nothing was added"


def report_text(report: dict) -> str:
    """The editor's message for a report: its code's text, then the pipeline's warnings one a line."""
    fields = {key: value for key, value in report.items() if key not in ("code", "warnings")}
    text = REPORTS[report["code"]].format(**fields)
    return "".join([text] + ["\n" + str(warning) for warning in report.get("warnings") or []])


# -- the job on the retalk server --------------------------------------------------------------------------------
def check_clip(shot: Shot) -> Fraction:
    """The clip's exact rate, after checking Resolve sees the same rate and range as the file holds."""
    from retalk import media

    try:
        info = media.probe(shot.path)
    except MediaError as err:
        raise MediaError(f"unsupported media: {err}") from None
    if abs(info.rate - shot.rate) > RATE_TOLERANCE:
        raise InputError(
            f"Resolve plays {Path(shot.path).name} at {shot.fps} fps but the file is "
            f"{float(info.rate):.3f} fps; reset Clip Attributes > Frame Rate"
        )
    if not 0 <= shot.start < shot.end <= info.frame_count:
        raise InputError(
            f"the shot uses source frames {shot.start}-{shot.end - 1} but the file has {info.frame_count} frames"
        )
    return info.rate


def connect(settings: Settings):
    """A connected client for the server in the settings, with CURVE keys when the settings name them."""
    from retalk_protocol.client import Client
    from retalk_protocol.codec import ProtocolError

    import retalk

    server_key = client_key = None
    if settings.keys:
        import zmq.auth

        try:
            server_key, _ = zmq.auth.load_certificate(settings.keys["server"])
            client_key = zmq.auth.load_certificate(settings.keys["client"])
        except (OSError, ValueError) as err:
            raise RetalkError(
                f"cannot read the CURVE keys ({err}); run `retalk resolve install --keys DIR`"
            ) from None
    client = Client(
        settings.server,
        name=f"resolve-plugin/{retalk.__version__}",
        server_key=server_key,
        client_key=client_key,
        timeout=float(settings.connect_timeout),
    )
    try:
        client.connect()
    except ProtocolError:
        client.close()
        if settings.keys:
            public = Path(settings.keys["client"]).with_suffix(".key").name
            raise RetalkError(
                f"cannot reach the retalk server at {settings.server}: is `retalk serve` running there, "
                f"and is {public} in its --allow folder?"
            ) from None
        raise RetalkError(
            f"cannot reach the retalk server at {settings.server}; start it with `retalk serve`"
        ) from None
    client.timeout = TRANSFER_TIMEOUT
    return client


def result_path(stem: str, codec: str) -> Path:
    """``stem`` + the codec's extension, numbered further if a file of that name exists."""
    from retalk import media

    extension = media.default_extension(codec)
    path, copy = Path(stem + extension), 2
    while path.exists():
        path, copy = Path(f"{stem}-{copy}{extension}"), copy + 1
    return path


def run_job(
    settings: Settings,
    shot: Shot,
    choice: Choice,
    should_cancel: Callable[[], bool],
    on_progress: Callable[[dict], None],
    on_accepted: Callable[[str], None],
) -> dict:
    """Submit the re-dub, follow it, fetch the result: the final event for the entry (``done`` or
    ``cancelled``). Failures raise RetalkError with the editor's message."""
    from retalk_protocol.codec import ProtocolError

    audio, offset = choice.audio()
    rate = check_clip(shot)
    client = connect(settings)
    try:
        options = dict(choice.options)
        job = client.submit_or_upload(
            shot.path,
            audio,
            start=shot.start,
            end=shot.end,
            rate=rate,
            audio_offset=offset,
            engine=options.pop("engine"),
            options=dict(options, **FIXED_OPTIONS),
        )
        on_accepted(job)
        final = client.follow(job, cancel=should_cancel, on_progress=on_progress)
        if final["state"] == "cancelled":
            return {"event": "cancelled", "message": CANCELLED_TEXT}
        if final["state"] != "done":
            error = final.get("error") or {}
            raise RetalkError(f"the re-dub failed: {error.get('message', final['state'])}")
        path = result_path(shot.output_stem(), final["result"]["codec"])
        path.parent.mkdir(parents=True, exist_ok=True)
        client.fetch(job, str(path))
    except ProtocolError as err:
        raise RetalkError(f"retalk server {settings.server}: {err.message}") from None
    except OSError as err:
        raise RetalkError(f"retalk could not write the result: {err}") from None
    finally:
        client.close()
    result = final["result"]
    return {
        "event": "done",
        "path": str(path),
        "frames": result["frames"],
        "rate": result["rate"],
        "warnings": result["warnings"],
    }


# -- one run of the bridge -----------------------------------------------------------------------------------
def progress_text(fields: dict, detailed: bool = True) -> tuple[str, float]:
    """A job's progress (PROGRESS fields, or the bridge's own ``accepted``) as a status line and a fraction
    done: for the window, units and time left; for the console, tens of percent (a line each, at most)."""
    state, stage = fields.get("state", ""), fields.get("stage") or ""
    done, total = fields.get("done") or 0, fields.get("total") or 0
    fraction = float(done) / total if total else 0.0
    if state == "accepted":
        job, server = fields["job"], fields["server"]
        return (
            f"Queued on {server} as job {job} (to stop it elsewhere: retalk cancel {job} --server {server})",
            0.0,
        )
    if state == "queued":
        return "Waiting in the retalk queue...", 0.0
    if not stage:
        return "Re-dubbing...", fraction
    if not detailed:
        return f"Re-dubbing: {stage} {int(fraction * 10) * 10}%", fraction
    text = f"Re-dubbing: {stage} {done}/{total}"
    if fields.get("eta") is not None:
        text += f" (about {fields['eta']:.0f} s left)"
    return text, fraction


KEEPALIVE_SECONDS = 2.0  # during a job, the longest the entry goes without a line (§4.3)


class Events:
    """The JSON lines the entry reads (§4). Writing to an entry that has gone away calls ``on_gone``."""

    def __init__(self, stream, on_gone: Callable[[], None]):
        self.stream = stream
        self.on_gone = on_gone
        self.lock = threading.Lock()
        self.last_write = time.monotonic()

    def emit(self, event: str, **fields) -> None:
        line = json.dumps(dict(fields, event=event), ensure_ascii=False)
        with self.lock:
            self.last_write = time.monotonic()
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the entry (and Resolve with it) went away: cancel the job
                self.on_gone()

    def keep_alive(self) -> None:
        """An ``alive`` line when the entry has had none for a while: only a write finds out it is gone."""
        if time.monotonic() - self.last_write > KEEPALIVE_SECONDS:
            self.emit("alive")


def redub(request: dict, settings: Settings, dialog, events: Events, cancel: threading.Event) -> int:
    """The re-dub of one shot (§3.1): the dialog, the job, and one final event for the entry."""
    try:
        # 1. the shot and the audio clips under it, from what the entry read in Resolve
        try:
            shot = Shot.from_facts(request["shot"])
            clips = [AudioClip.from_facts(facts, shot) for facts in request["audio"]]
        except (KeyError, TypeError, ValueError) as err:
            raise mismatch(err) from None

        # 2. the editor's choice of replacement audio and options
        choice = dialog.choose(shot, clips, settings.options)
        if choice is None:
            events.emit("closed")
            return 0
        settings.options = choice.options
        settings.remember()

        # 3. the job, with progress (as status lines for Resolve's console too) and Cancel
        def work(show_progress: Callable[[dict], None]) -> dict:
            shown: list[str] = []

            def on_progress(fields: dict) -> None:
                text, _ = progress_text(fields, detailed=False)
                if not shown or shown[-1] != text:
                    shown.append(text)
                    events.emit("status", text=text)
                show_progress(fields)

            def should_cancel() -> bool:  # asked every moment of the job: the keep-alive rides on it
                events.keep_alive()
                return cancel.is_set()

            def on_accepted(job: str) -> None:
                on_progress({"state": "accepted", "job": job, "server": settings.server})

            return run_job(settings, shot, choice, should_cancel, on_progress, on_accepted)

        final = dialog.follow(work, cancel)
    except RetalkError as err:
        events.emit("error", message=str(err))
        dialog.show(str(err))
        return 1
    # 4. the result, for the entry to place in Resolve
    events.emit(final.pop("event"), **final)
    return 0


def report(request: dict, dialog, events: Events) -> int:
    """The entry's outcome in words (§3.2): to the entry for Resolve's console, and in the window."""
    try:
        text = report_text(request["report"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        events.emit("error", message=str(mismatch(err)))
        return 1
    events.emit("message", text=text)
    dialog.show(text)
    return 0


def mismatch(err: Exception) -> InputError:
    """A request missing what this bridge needs: an entry from another retalk version (§2.2)."""
    return InputError(f"the Resolve entry does not match this retalk ({err!r}); run `retalk resolve install`")


def read_request(argv: list[str]) -> dict:
    if len(argv) != 1:
        raise InputError("usage: python -m retalk.resolve_bridge REQUEST.json")
    try:
        request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(
            f"the Resolve entry's request is unreadable ({err}); run `retalk resolve install`"
        ) from None
    if not isinstance(request, dict) or request.get("bridge") != FORMAT_VERSION:
        raise InputError("the Resolve entry does not match this retalk; run `retalk resolve install`")
    return request


def note_host(settings: Settings, host) -> None:
    """Remember which entry ran in which Resolve: `retalk resolve install` installs what fits it."""
    if isinstance(host, dict) and host.get("entry") in ("lua", "python"):
        seen = {
            "entry": host["entry"],
            "product": str(host.get("product") or ""),
            "version": host.get("version"),
        }
        if seen != settings.resolve and isinstance(seen["version"], list) and seen["version"]:
            settings.resolve = seen
            settings.remember()


def main(argv: list[str] | None = None) -> int:
    from retalk.resolve_dialog import open_dialog

    sys.stdout.reconfigure(encoding="utf-8")  # paths and messages in any language, on every OS
    cancel = threading.Event()
    events = Events(sys.stdout, on_gone=cancel.set)
    try:
        request = read_request(sys.argv[1:] if argv is None else argv)
        settings = Settings.load()
        note_host(settings, request.get("host"))
    except (RetalkError, OSError) as err:
        events.emit("error", message=str(err))
        return 1
    dialog = open_dialog(events)
    try:
        if request.get("kind") == "report":
            return report(request, dialog, events)
        return redub(request, settings, dialog, events, cancel)
    finally:
        dialog.close()


if __name__ == "__main__":
    sys.exit(main())

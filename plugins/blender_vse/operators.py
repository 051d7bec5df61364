"""The "Re-dub with audio…" operator, its menu entries, and the task that puts the result back on the timeline."""

from __future__ import annotations

import os
import re
from fractions import Fraction

import bpy

from . import compat, options
from .session import RedubSession, ServerSettings, Submission

_TIMER_STEP = 0.1  # seconds between progress polls
_TOP_CHANNEL = 128
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")

# Jobs started in background mode (no event loop: timers and modal handlers never run): whoever runs Blender
# headless drives them with RedubTask.tick(context), as the modal timer would, until it returns True.
background_tasks: list[RedubTask] = []


class RedubError(Exception):
    """A problem the user can fix; reported as one line."""


def _preferences(context):
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def server_settings(context) -> ServerSettings:
    prefs = _preferences(context)
    if prefs is None:
        return ServerSettings(endpoint=options.DEFAULT_SERVER)
    return ServerSettings(
        endpoint=prefs.server.strip(),
        timeout=prefs.timeout,
        server_key_file=bpy.path.abspath(prefs.server_key_file) if prefs.server_key_file else "",
        client_key_file=bpy.path.abspath(prefs.client_key_file) if prefs.client_key_file else "",
    )


def is_local(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host in _LOCAL_HOSTS


def selected_movie_strip(context):
    editor = context.scene.sequence_editor if context.scene else None
    if editor is None:
        return None
    active = editor.active_strip
    if active is not None and active.type == "MOVIE" and active.select:
        return active
    return next((s for s in compat.top_strips(editor) if s.select and s.type == "MOVIE"), None)


def selected_sound_strip(context):
    editor = context.scene.sequence_editor
    return next((s for s in compat.top_strips(editor) if s.select and s.type == "SOUND"), None)


def _take_number(editor, movie, folder: str) -> int:
    """One more than the highest take of this strip, on the timeline or on disk."""
    pattern = re.compile(re.escape(movie.name) + r" take (\d+)$")
    takes = [int(m.group(1)) for s in compat.all_strips(editor) if (m := pattern.match(s.name))]
    stem = re.compile(re.escape(_file_stem(movie.name)) + r"_take(\d+)\.")
    if os.path.isdir(folder):
        takes += [int(m.group(1)) for name in os.listdir(folder) if (m := stem.match(name))]
    return max(takes, default=0) + 1


def _rate_text(rate: Fraction) -> str:
    return str(rate.numerator) if rate.denominator == 1 else f"{float(rate):.3f}"


def _absolute(path: str) -> str:
    """A Blender path ("//media/x.mp4") as a plain absolute one: servers refuse ".." components (§6.2)."""
    return os.path.normpath(bpy.path.abspath(path))


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "strip"


def _free_channel(editor, above: int, start: int, end: int) -> int:
    """The first channel above ``above`` with nothing in [start, end)."""
    busy = set()
    for strip in compat.top_strips(editor):
        if compat.left_handle(strip) < end and compat.right_handle(strip) > start:
            busy.add(strip.channel)
    for channel in range(above + 1, _TOP_CHANNEL + 1):
        if channel not in busy:
            return channel
    raise RedubError(f"no free channel above channel {above} for frames {start}-{end}")


def build_job(context, props) -> tuple[Submission, dict]:
    """Read the strip, the audio and the options from Blender; returns the submission and where the result
    goes."""
    scene = context.scene
    editor = scene.sequence_editor
    movie = selected_movie_strip(context)
    if movie is None:
        raise RedubError("select a movie strip to re-dub")
    if not bpy.data.filepath:
        raise RedubError(f"save the .blend first: results go to {options.RESULT_FOLDER} beside it")
    video = _absolute(movie.filepath)
    if not os.path.isfile(video):
        raise RedubError(f"the movie strip's file {video} does not exist")
    if movie.fps <= 0:
        raise RedubError(f"Blender cannot read the frame rate of {video}")

    # Blender shows a movie strip's source frames one per timeline frame, whatever the two rates are: a
    # movie at another rate than the scene plays too fast or too slow, and its re-dub (made at the movie's
    # own rate, with the audio at true speed) could not line up with the timeline.
    timeline_rate = compat.scene_rate(scene)
    source_rate = compat.exact_rate(movie.fps)
    if source_rate != timeline_rate:
        raise RedubError(
            f"the scene runs at {_rate_text(timeline_rate)} fps but {movie.name!r} is {_rate_text(source_rate)}"
            f" fps; set the scene's frame rate to {_rate_text(source_rate)} (Output Properties > Frame Rate)"
        )
    if movie.use_reverse_frames or len(movie.retiming_keys):
        raise RedubError(f"strip {movie.name!r} is reversed or retimed; re-dub an unretimed copy of it")
    # Source frames actually shown: the handles' distance from where the content begins on the timeline,
    # plus the source frames hard-trimmed off before that.
    first, last = compat.left_handle(movie), compat.right_handle(movie)
    origin = round(compat.content_start(movie)) - compat.hard_trim(movie)
    start, end = first - origin, last - origin
    if start < 0 or end <= start:
        raise RedubError(f"strip {movie.name!r} shows no source frames ({first}-{last})")

    sound = selected_sound_strip(context) if props.audio_source == "STRIP" else None
    if props.audio_source == "STRIP":
        if sound is None or sound.sound is None:
            raise RedubError("select a sound strip with the new audio too, or choose an audio file")
        late = compat.left_handle(sound) - first
        if late > 0:
            raise RedubError(
                f"sound strip {sound.name!r} starts {late} frames after movie strip {movie.name!r};"
                " move or extend it to cover the movie's first frame"
            )
        audio = _absolute(sound.sound.filepath)
        # Seconds into the audio file that play at the movie strip's first shown frame.
        offset = (first - Fraction(compat.content_start(sound)).limit_denominator(1000)) / timeline_rate
    else:
        audio = _absolute(props.audio_file) if props.audio_file else ""
        offset = Fraction(props.audio_offset).limit_denominator(1000)
    if not os.path.isfile(audio):
        raise RedubError(f"the audio file {audio or '(none)'} does not exist")

    folder = bpy.path.abspath(options.RESULT_FOLDER)
    take = _take_number(editor, movie, folder)
    os.makedirs(folder, exist_ok=True)
    submission = Submission(
        video=video,
        audio=audio,
        start=start,
        end=end,
        rate=source_rate,
        audio_offset=offset,
        engine=props.engine,
        options={
            option.name: options.submitted_value(option, getattr(props, option.name))
            for option in options.JOB_OPTIONS.values()
        },
        output_stem=os.path.join(folder, f"{_file_stem(movie.name)}_take{take}"),
    )
    target = {"movie": movie.name, "take": take, "first": first, "last": last}
    return submission, target


class RedubTask:
    """A running re-dub: its session plus where the result goes on the timeline."""

    def __init__(self, scene, session: RedubSession, target: dict):
        self.scene_name = scene.name
        self.session = session
        self.target = target
        self.new_strips: list[str] = []
        self.message = ""

    def cancel(self) -> None:
        self.session.cancel()

    def tick(self, context) -> bool:
        """One poll; True once the task ended (result placed, failed or cancelled). Never blocks."""
        if not self.session.finished:
            return False
        if self.session.state == "done" and not self.new_strips:
            try:
                self._place(bpy.data.scenes[self.scene_name])
            except (RedubError, RuntimeError, KeyError) as err:
                self.session.state, self.session.error = "failed", f"could not add the result: {err}"
        self.message = self._final_message()
        return True

    def _final_message(self) -> str:
        session = self.session
        if session.state == "done":
            return f"retalk: added {', '.join(self.new_strips)} ({os.path.basename(session.output)})"
        if session.state == "cancelled":
            return "retalk: cancelled"
        return f"retalk: {session.error}"

    def _place(self, scene) -> None:
        """The result on the first free channel above the original, same position and length; audio beside it."""
        editor = scene.sequence_editor
        target = self.target
        original = compat.all_strips(editor).get(target["movie"])
        if original is None:
            raise RedubError(f"strip {target['movie']!r} is gone")
        first, last = target["first"], target["last"]
        strips = compat.top_strips(editor)
        name = f"{target['movie']} take {target['take']}"
        channel = _free_channel(editor, original.channel, first, last)
        movie = strips.new_movie(name=name, filepath=self.session.output, channel=channel, frame_start=first)
        _trim_to(movie, last)
        self.new_strips.append(movie.name)
        sound_channel = _free_channel(editor, channel, first, last)
        try:
            sound = strips.new_sound(
                name=f"{name} audio", filepath=self.session.output, channel=sound_channel, frame_start=first
            )
        except RuntimeError:  # no audio stream in the result, or a Blender built without sound
            return
        _trim_to(sound, last)
        self.new_strips.append(sound.name)


def _trim_to(strip, last: int) -> None:
    if compat.right_handle(strip) > last:
        compat.set_right_handle(strip, last)


class SEQUENCER_OT_retalk_redub(bpy.types.Operator):
    """Re-dub the selected movie strip with replacement audio on a retalk server"""

    bl_idname = "sequencer.retalk_redub"
    bl_label = "Re-dub with audio…"
    # UNDO without REGISTER: the strips added when the job ends are one undo step, and no redo panel offers
    # to re-run (and re-render) the job.
    bl_options = {"UNDO"}

    audio_source: bpy.props.EnumProperty(
        name="Audio",
        items=[
            ("STRIP", "Selected sound strip", "The selected sound strip, aligned as on the timeline"),
            ("FILE", "File", "An audio file, from the offset below"),
        ],
        default="STRIP",
    )
    audio_file: bpy.props.StringProperty(name="Audio file", subtype="FILE_PATH")
    audio_offset: bpy.props.FloatProperty(name="Audio offset", description="Seconds into the file", min=0.0)
    # + one property per job option, added from the table below the class

    _task = None  # the RedubTask this modal run follows
    _timer = None

    @classmethod
    def poll(cls, context):
        return selected_movie_strip(context) is not None

    def invoke(self, context, event):
        prefs = _preferences(context)
        if prefs is not None:
            self.codec = prefs.codec
        if selected_sound_strip(context) is None:
            self.audio_source = "FILE"
        return context.window_manager.invoke_props_dialog(self, width=400)

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "audio_source")
        if self.audio_source == "FILE":
            layout.prop(self, "audio_file")
            layout.prop(self, "audio_offset")
        for option in options.FIELDS:  # an option the chosen engine ignores is shown disabled
            row = layout.row()
            row.enabled = options.honoured(option, self.engine)
            row.prop(self, option.name)

    def execute(self, context):
        settings = server_settings(context)
        if not is_local(settings.endpoint) and not bpy.app.online_access:
            self.report(
                {"ERROR"},
                f"{settings.endpoint} is not on this machine and Blender's online access is off"
                " (Preferences > System > Network)",
            )
            return {"CANCELLED"}
        try:
            submission, target = build_job(context, self)
        except RedubError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        session = RedubSession(settings, submission, client_name=f"blender-vse/{bpy.app.version_string}")
        session.start()
        task = RedubTask(context.scene, session, target)
        if bpy.app.background or context.window is None:
            background_tasks.append(task)
            self.report({"INFO"}, "retalk: job started in the background")
            return {"FINISHED"}
        self._task = task
        self._timer = context.window_manager.event_timer_add(_TIMER_STEP, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self._task.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        if not self._task.tick(context):
            context.workspace.status_text_set(self._task.session.status_line())
            return {"RUNNING_MODAL"}
        context.window_manager.event_timer_remove(self._timer)
        context.workspace.status_text_set(None)
        task = self._task
        if task.session.state == "done":
            self.report({"INFO"}, task.message)
            return {"FINISHED"}  # the strips were added in this call: one undo step
        self.report({"WARNING"} if task.session.state == "cancelled" else {"ERROR"}, task.message)
        return {"CANCELLED"}


def option_property(option):
    """The bpy property of a job option (retalk_protocol.options): its label, help, type, choices, default."""
    common = {"name": options.label(option), "description": option.help, "default": option.default}
    if option.type is bool:
        return bpy.props.BoolProperty(**common)
    if option.type is int:
        return bpy.props.IntProperty(**common)
    if option.choices:  # a path option offers its named choices here; its files are picked elsewhere
        return bpy.props.EnumProperty(items=options.enum_items(option.choices), **common)
    return bpy.props.StringProperty(**common)


# One field per job option, made from the table: a new option appears in the dialog without an edit here.
SEQUENCER_OT_retalk_redub.__annotations__.update(
    {option.name: option_property(option) for option in options.FIELDS}
)


def draw_menu(self, context):
    self.layout.separator()
    self.layout.operator(SEQUENCER_OT_retalk_redub.bl_idname, icon="SPEAKER")


CLASSES = (SEQUENCER_OT_retalk_redub,)
MENUS = (bpy.types.SEQUENCER_MT_context_menu, bpy.types.SEQUENCER_MT_strip)

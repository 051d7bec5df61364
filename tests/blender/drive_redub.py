"""Runs INSIDE bpy (a bpy wheel's Python): installs the built extension, builds a scene, runs the operator.

    python drive_redub.py CONFIG.json

CONFIG: ``zip``, ``video``, ``audio``, ``blend`` (where to save the .blend), ``layout`` (scene fps and where
the strips go: ``fps``, ``movie_at``, ``hard_trim``, ``trim_left``, ``trim_right``, ``sound_at``), ``scenarios``: a list of
``{"name", "endpoint", "timeout", "cancel_when_running", "server_key_file", "client_key_file", "scene_fps",
"start_local_server", "shift_sound"}``, ``report`` (where to write the JSON results), ``pids`` (where to write the pids of
servers the add-on started). The report also lists the operator's fields (``fields``: type, default, items).
Background Blender runs no timers or modal handlers, so this drives the operator's task with the same
``tick()`` its modal timer calls, and cancels with the same ``cancel()`` its Esc key calls.
"""

import json
import sys
import time

import bpy

EXTENSION = "bl_ext.user_default.retalk_redub"
TICK = 0.05
DEADLINE = 240.0


def install(zip_path):
    bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    if EXTENSION not in bpy.context.preferences.addons:
        raise SystemExit(f"the extension did not install from {zip_path}")


def build_scene(config):
    layout = config["layout"]
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = layout["fps"], 1.0
    editor = scene.sequence_editor_create()
    compat = sys.modules[EXTENSION + ".compat"]
    strips = compat.top_strips(editor)
    movie = strips.new_movie(name="shot", filepath=config["video"], channel=2, frame_start=layout["movie_at"])
    if hasattr(movie, "content_trim_start"):
        movie.content_trim_start = layout["hard_trim"]
    else:
        movie.animation_offset_start = layout["hard_trim"]
    start, end = compat.left_handle(movie), compat.right_handle(movie)
    if hasattr(movie, "left_handle"):
        movie.left_handle, movie.right_handle = start + layout["trim_left"], end - layout["trim_right"]
    else:
        movie.frame_final_start = start + layout["trim_left"]
        movie.frame_final_end = end - layout["trim_right"]
    # Something already on channel 3 over the shot: the take must go to the first FREE channel above.
    strips.new_movie(name="obstacle", filepath=config["video"], channel=3, frame_start=layout["movie_at"])
    sound_name = None
    if bpy.app.build_options.audaspace:  # the bpy 4.2 wheel is built without sound: no sound strips there
        sound_name = strips.new_sound(
            name="line", filepath=config["audio"], channel=1, frame_start=layout["sound_at"]
        ).name
    bpy.ops.wm.save_as_mainfile(filepath=config["blend"])
    return movie.name, sound_name


def select(editor, compat, names):
    for strip in compat.all_strips(editor):
        strip.select = strip.name in names
    editor.active_strip = compat.all_strips(editor)[names[0]]


def describe(strip, compat):
    return {
        "name": strip.name,
        "type": strip.type,
        "channel": strip.channel,
        "start": compat.left_handle(strip),
        "end": compat.right_handle(strip),
        "filepath": bpy.path.abspath(strip.filepath if strip.type == "MOVIE" else strip.sound.filepath),
    }


def run_scenario(config, scenario, movie_name, sound_name):
    compat = sys.modules[EXTENSION + ".compat"]
    prefs = bpy.context.preferences.addons[EXTENSION].preferences
    prefs.server, prefs.timeout = scenario["endpoint"], scenario["timeout"]
    prefs.server_key_file = scenario.get("server_key_file", "")
    prefs.client_key_file = scenario.get("client_key_file", "")
    if scenario.get("start_local_server"):
        bpy.ops.retalk.start_local_server()
        preferences = sys.modules[EXTENSION + ".preferences"]
        with open(config["pids"], "w") as fh:  # for the caller to stop them: they outlive Blender
            json.dump([server.pid for server in preferences.started_servers], fh)
    scene = bpy.context.scene
    scene.render.fps = scenario.get("scene_fps", config["layout"]["fps"])
    editor = scene.sequence_editor
    shift = scenario.get("shift_sound", 0)  # frames to move the sound strip by for this scenario only
    if shift and not sound_name:
        return {"ran": False}  # a Blender without sound support has no sound strip to move
    if shift:
        _move(compat.all_strips(editor)[sound_name], shift)
    try:
        return _redub(config, scenario, editor, movie_name, sound_name)
    finally:
        if shift:
            _move(compat.all_strips(editor)[sound_name], -shift)


def _move(strip, frames):
    if hasattr(strip, "content_start"):
        strip.content_start += frames
    else:
        strip.frame_start += frames


def _redub(config, scenario, editor, movie_name, sound_name):
    compat = sys.modules[EXTENSION + ".compat"]
    operators = sys.modules[EXTENSION + ".operators"]
    select(editor, compat, [movie_name, sound_name] if sound_name else [movie_name])
    before = {s.name for s in compat.all_strips(editor)}
    if sound_name:  # the new line plays where the sound strip sits on the timeline
        audio = {"audio_source": "STRIP"}
    else:  # the same alignment, given as the file and its offset
        layout = config["layout"]
        shown = compat.left_handle(compat.all_strips(editor)[movie_name])
        offset = (shown - layout["sound_at"]) / layout["fps"]
        audio = {"audio_source": "FILE", "audio_file": config["audio"], "audio_offset": offset}
    result = {
        "ran": True,
        "poll": bpy.ops.sequencer.retalk_redub.poll(),
        "audio_source": audio["audio_source"],
    }
    try:
        result["operator"] = sorted(
            bpy.ops.sequencer.retalk_redub(engine="preview", codec="lossless", **audio)
        )
    except RuntimeError as err:  # how bpy.ops surfaces an operator that reported an error and cancelled
        new = [s.name for s in compat.all_strips(editor) if s.name not in before]
        return dict(result, operator=["CANCELLED"], message=str(err), new=new)
    task = operators.background_tasks.pop()
    ticks, slowest, started, status_lines = 0, 0.0, time.monotonic(), []
    while True:
        status = task.session.status_line()  # what the modal operator shows in the status bar
        if not status_lines or status_lines[-1] != status:
            status_lines.append(status)
        # Cancel (what Esc does) once the job is running and has reported progress.
        if scenario.get("cancel_when_running") and task.session.state == "running" and task.session.total:
            task.cancel()
        tick_start = time.monotonic()
        finished = task.tick(bpy.context)
        slowest = max(slowest, time.monotonic() - tick_start)
        ticks += 1
        if finished or time.monotonic() - started > DEADLINE:
            break
        time.sleep(TICK)
    submission = task.session.submission
    result.update(
        finished=finished,
        state=task.session.state,
        error=task.session.error,
        message=task.message,
        job=task.session.job,
        media_sent=task.session.media_sent,
        output=task.session.output,
        result=task.session.result,
        start=submission.start,
        end=submission.end,
        rate=[submission.rate.numerator, submission.rate.denominator],
        audio_offset=[submission.audio_offset.numerator, submission.audio_offset.denominator],
        ticks=ticks,
        seconds=time.monotonic() - started,
        status_lines=status_lines,
        slowest_tick=slowest,
        original=describe(compat.all_strips(editor)[movie_name], compat),
        new=[describe(s, compat) for s in compat.all_strips(editor) if s.name not in before],
    )
    return result


def main():
    config = json.loads(open(sys.argv[-1]).read())
    install(config["zip"])
    movie_name, sound_name = build_scene(config)
    report = {
        "version": list(bpy.app.version),
        "audaspace": bpy.app.build_options.audaspace,
        "online_access": bpy.app.online_access,
        "scenarios": {},
    }
    for scenario in config["scenarios"]:
        report["scenarios"][scenario["name"]] = run_scenario(config, scenario, movie_name, sound_name)
    report["menus"] = {
        menu.__name__: any(draw.__module__.startswith(EXTENSION) for draw in menu._dyn_ui_initialize())
        for menu in (bpy.types.SEQUENCER_MT_context_menu, bpy.types.SEQUENCER_MT_strip)
    }
    editor = bpy.context.scene.sequence_editor
    for strip in sys.modules[EXTENSION + ".compat"].all_strips(editor):
        strip.select = False
    report["poll_without_selection"] = bpy.ops.sequencer.retalk_redub.poll()
    report["fields"] = {
        prop.identifier: {
            "type": prop.type,
            "default": prop.default,
            "items": [item.identifier for item in prop.enum_items] if prop.type == "ENUM" else [],
            "description": prop.description,
        }
        for prop in bpy.ops.sequencer.retalk_redub.get_rna_type().properties
        if prop.identifier != "rna_type"
    }
    with open(config["report"], "w") as fh:
        json.dump(report, fh, indent=1)


main()

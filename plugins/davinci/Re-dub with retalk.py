"""Re-dub with retalk: a DaVinci Resolve Edit-page menu entry (Workspace > Scripts > Edit), in Python.

Re-dubs the selected video clip (or the one under the playhead) with replacement audio on a retalk server and
puts the result back on the same timeline item as a new take. Installed by `retalk resolve install`, which
writes RETALK_PYTHON below.

This entry does only what needs Resolve: it reads the shot and the audio clips under it, hands them to retalk's
bridge (`RETALK_PYTHON -m retalk.resolve_bridge REQUEST.json`; the messages are written down in retalk's
protocol/RESOLVE_BRIDGE.md), which shows the dialog, runs the job and words every message, and then it places
the result. `Re-dub with retalk.lua` is the same entry in Lua, making the same calls.

It runs under whatever Python 3 Resolve finds (>= 3.6), so it is plain standard-library Python. It calls only
methods the Resolve scripting README documents and checks every answer: Resolve reports failure with None or
False.
"""

import json
import os
import subprocess
import tempfile

RETALK_PYTHON = None  # written by `retalk resolve install`: the interpreter retalk is installed in

BRIDGE_FORMAT = 1  # the "bridge" field of a request
BIN_NAME = "retalk"
FINAL_EVENTS = ("done", "cancelled", "closed", "error", "message")
NOT_WIRED = "retalk is not wired to this script: run `retalk resolve install` in retalk's environment"
# AppendToTimeline takes "trackIndex"/"recordFrame" in a clipInfo from the 2024-04 README (Resolve 19) on.
PLACEMENT_MAJOR_VERSION = 19


class Failure(Exception):
    """An outcome for the editor, as a report the bridge words: a code and its fields."""

    def __init__(self, code, **fields):
        super().__init__(code)
        self.report = dict(fields, code=code)


# -- reading Resolve -----------------------------------------------------------------------------------------
def _method(obj, name):
    """A Resolve method, or None where this version lacks it (e.g. GetSelectedClips before Resolve 21)."""
    try:
        return getattr(obj, name, None)
    except Exception:  # a scripting proxy may raise anything for an unknown name
        return None


def _probe(obj, name):
    """What a version-dependent reader answers, or None where this version lacks it."""
    reader = _method(obj, name)
    return reader() if reader is not None else None


def _track_count(timeline, track_type):
    count = timeline.GetTrackCount(track_type)
    return int(count) if count else 0


def _items_on_track(timeline, track_type, index):
    return timeline.GetItemListInTrack(track_type, index) or []


def _same_item(a, b):
    return a is b or a.GetUniqueId() == b.GetUniqueId()


def _video_track_of(timeline, item):
    """The video track index holding ``item``, or None."""
    for track in range(1, _track_count(timeline, "video") + 1):
        for other in _items_on_track(timeline, "video", track):
            if _same_item(other, item):
                return track
    return None


def find_shot(timeline):
    """The clip to re-dub and its video track: the selected video clip (Resolve 21+), else the playhead's."""
    selected = _probe(timeline, "GetSelectedClips") or []
    on_video = [(item, _video_track_of(timeline, item)) for item in selected]
    on_video = [(item, track) for item, track in on_video if track is not None]
    if len(on_video) > 1:
        raise Failure("several-selected", count=len(on_video))
    if on_video:
        return on_video[0]
    item = timeline.GetCurrentVideoItem()
    track = _video_track_of(timeline, item) if item else None
    if track is None:
        raise Failure("no-clip")
    return item, track


def _media_facts(item):
    media = item.GetMediaPoolItem()
    if not media:
        return {"path": None, "fps": None}
    return {"path": media.GetClipProperty("File Path") or "", "fps": media.GetClipProperty("FPS")}


def shot_facts(project, item):
    """What the bridge needs to know about the timeline item (request field "shot")."""
    facts = {
        "clip": item.GetName(),
        "timeline_fps": project.GetSetting("timelineFrameRate"),
        "record_start": item.GetStart(),
        "record_duration": item.GetDuration(),
        "source_start": _probe(item, "GetSourceStartFrame"),  # Resolve 19.1+
        "source_end": _probe(item, "GetSourceEndFrame"),
        "left_offset": item.GetLeftOffset(),
        "takes": item.GetTakesCount(),
    }
    facts.update(_media_facts(item))
    return facts


def audio_facts(timeline, record_start):
    """The audio clips under the shot's first frame, one per track (request field "audio")."""
    found = []
    for track in range(1, _track_count(timeline, "audio") + 1):
        for item in _items_on_track(timeline, "audio", track):
            if record_start is not None and item.GetStart() <= record_start < item.GetEnd():
                facts = {
                    "track": track,
                    "track_name": timeline.GetTrackName("audio", track),
                    "clip": item.GetName(),
                    "record_start": item.GetStart(),
                    "source_start": _probe(item, "GetSourceStartFrame"),
                    "left_offset": item.GetLeftOffset(),
                }
                facts.update(_media_facts(item))
                found.append(facts)
                break
    return found


class Scene:
    """The Resolve objects the result goes back into."""

    def __init__(self, resolve, timeline, media_pool, item, track):
        self.resolve = resolve
        self.timeline = timeline
        self.media_pool = media_pool
        self.item = item
        self.track = track


def host_facts(resolve):
    return {
        "entry": "python",
        "product": resolve.GetProductName(),
        "version": list(resolve.GetVersion() or []),
    }


def read_shot(resolve):
    """The scene and the bridge's re-dub request; raises Failure where there is nothing to re-dub."""
    manager = resolve.GetProjectManager()
    project = manager.GetCurrentProject() if manager else None
    if not project:
        raise Failure("no-project")
    timeline = project.GetCurrentTimeline()
    if not timeline:
        raise Failure("no-timeline")
    media_pool = project.GetMediaPool()
    if not media_pool:
        raise Failure("no-media-pool")
    item, track = find_shot(timeline)
    shot = shot_facts(project, item)
    request = {
        "bridge": BRIDGE_FORMAT,
        "kind": "redub",
        "host": host_facts(resolve),
        "shot": shot,
        "audio": audio_facts(timeline, shot["record_start"]),
    }
    return Scene(resolve, timeline, media_pool, item, track), request


# -- placing the result --------------------------------------------------------------------------------------
def retalk_bin(media_pool, path):
    """The media pool's "retalk" bin, made under the root folder on first use."""
    root = media_pool.GetRootFolder()
    if not root:
        raise Failure("no-bin", path=path)
    for folder in root.GetSubFolderList() or []:
        if folder.GetName() == BIN_NAME:
            return folder
    folder = media_pool.AddSubFolder(root, BIN_NAME)
    if not folder:
        raise Failure("no-bin", path=path)
    return folder


def import_result(media_pool, path):
    """Import the result file into the retalk bin; returns its media pool item."""
    folder = retalk_bin(media_pool, path)
    previous = media_pool.GetCurrentFolder()
    if not media_pool.SetCurrentFolder(folder):
        raise Failure("bin-not-opened", path=path)
    try:
        items = media_pool.ImportMedia([path]) or []
    finally:
        if previous:
            media_pool.SetCurrentFolder(previous)
    if not items:
        raise Failure("import-failed", path=path)
    return items[0]


def _same_media(a, b):
    return a is not None and (a is b or a.GetMediaId() == b.GetMediaId())


def add_as_take(item, media, frames):
    """Add ``media`` (frames 0..frames) as a take of ``item`` and select it; returns the take's index, or None
    where Resolve refuses the take."""
    if not item.AddTake(media, 0, frames):
        return None
    index = item.GetTakesCount()
    take = item.GetTakeByIndex(index) if index else None
    if not take or not _same_media(take.get("mediaPoolItem"), media):
        raise Failure("take-unlisted")
    if not item.SelectTakeByIndex(index):
        raise Failure("take-not-selected", take=index)
    return index


def place_above(scene, media, frames):
    """Put ``media`` on the first free video track above the shot at its record frame; returns the track or None."""
    version = scene.resolve.GetVersion() or [0]
    if int(version[0]) < PLACEMENT_MAJOR_VERSION:
        return None
    timeline, record_start = scene.timeline, scene.item.GetStart()
    record_end = scene.item.GetEnd()
    track = scene.track + 1
    while track <= _track_count(timeline, "video"):
        busy = [
            other
            for other in _items_on_track(timeline, "video", track)
            if other.GetStart() < record_end and other.GetEnd() > record_start
        ]
        if not busy:
            break
        track += 1
    else:
        if not timeline.AddTrack("video"):
            return None
    clip_info = {
        "mediaPoolItem": media,
        "startFrame": 0,
        "endFrame": frames,
        "trackIndex": track,
        "recordFrame": record_start,
    }
    placed = scene.media_pool.AppendToTimeline([clip_info]) or []
    if len(placed) != 1 or placed[0].GetStart() != record_start:
        if placed:
            timeline.DeleteClips(placed)
        return None
    return track


def place(scene, done):
    """The result into the retalk bin, then as a take (or on the track above, or just in the bin): the report."""
    path, frames = done["path"], int(done["frames"])
    media = import_result(scene.media_pool, path)
    clip = scene.item.GetName()
    take = add_as_take(scene.item, media, frames)
    if take is not None:
        return {"code": "take", "take": take, "clip": clip}
    track = place_above(scene, media, frames)
    if track is not None:
        return {"code": "above", "track": track, "clip": clip}
    return {"code": "bin", "file": os.path.basename(path)}


# -- the bridge ----------------------------------------------------------------------------------------------
def say(text):
    """A line in Resolve's console (Workspace > Console)."""
    print("retalk: " + text)


def run_bridge(request):
    """Run the bridge on ``request``, printing its status lines; returns its final event."""
    if not RETALK_PYTHON or not os.path.isfile(RETALK_PYTHON):
        return {"event": "error", "message": NOT_WIRED}
    handle, path = tempfile.mkstemp(prefix="retalk-resolve-", suffix=".json")
    log = tempfile.TemporaryFile()
    final = None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(request, out)
        try:
            process = subprocess.Popen(
                [RETALK_PYTHON, "-m", "retalk.resolve_bridge", path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
            )
        except OSError as err:
            return {"event": "error", "message": f"could not start retalk ({RETALK_PYTHON}): {err}"}
        with process.stdout:
            for line in process.stdout:
                try:
                    event = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if event.get("event") == "status":
                    say(event["text"])
                elif final is None and event.get("event") in FINAL_EVENTS:
                    final = event
        process.wait()
        if final is None:
            log.seek(0)
            reason = log.read().decode("utf-8", "replace").strip().splitlines()
            final = {
                "event": "error",
                "message": "retalk stopped unexpectedly: " + (reason[-1] if reason else ""),
            }
    finally:
        log.close()
        os.remove(path)
    return final


def report(resolve, outcome):
    """Have the bridge word ``outcome`` (and show it in its window); print it in the console."""
    final = run_bridge(
        {"bridge": BRIDGE_FORMAT, "kind": "report", "host": host_facts(resolve), "report": outcome}
    )
    say(final.get("text") or final.get("message") or "")


def main(resolve):
    """Re-dub the shot and place the result; every outcome reaches the editor."""
    try:
        scene, request = read_shot(resolve)
    except Failure as failure:
        report(resolve, failure.report)
        return
    final = run_bridge(request)
    if final["event"] == "done":
        try:
            outcome = place(scene, final)
        except Failure as failure:
            outcome = failure.report
        report(resolve, dict(outcome, warnings=final.get("warnings") or []))
    elif final.get("message"):  # error or cancelled; "closed" (the editor closed the dialog) needs no words
        say(final["message"])


def _resolve():
    """The Resolve object: given to menu scripts as `resolve`; else the README's way in from outside."""
    host = globals().get("resolve")
    if host is None:
        import DaVinciResolveScript

        host = DaVinciResolveScript.scriptapp("Resolve")
    return host


if __name__ == "__main__":
    main(_resolve())

"""Re-dub with retalk — a DaVinci Resolve Edit-page script (Workspace > Scripts > Edit).

Re-dubs the selected video clip (or the one under the playhead) with replacement audio on a retalk server and
puts the result back on the same timeline item as a new take. Installed by `retalk resolve install`, which
writes RETALK_PYTHON and RETALK_SERVER below.

This file runs under whatever Python 3 Resolve finds (>= 3.6), so it is plain standard-library Python: the
protocol work happens in a bridge process (`RETALK_PYTHON -m retalk.commands.resolve`) that speaks JSON lines
on stdin/stdout. It calls only methods the Resolve scripting README documents and checks every answer:
Resolve reports failure with None or False.
"""

import json
import os
import queue
import subprocess
import tempfile
import threading
from fractions import Fraction

RETALK_PYTHON = None  # written by `retalk resolve install`: the interpreter retalk is installed in
RETALK_SERVER = "tcp://127.0.0.1:7878"  # written by `retalk resolve install --server`

BIN_NAME = "retalk"
ENGINES = ("auto", "preview", "neural")
EXPRESSIONS = ("neutral", "smile")
CODECS = ("prores", "h264", "prores4444")  # what Resolve imports everywhere; the server also offers others
CONNECT_TIMEOUT = 10.0  # seconds the bridge waits for the server's WELCOME
# Resolve shows NTSC-family rates rounded; these are the exact rates behind the strings.
_NTSC_RATES = {
    "23.976": Fraction(24000, 1001),
    "29.97": Fraction(30000, 1001),
    "47.952": Fraction(48000, 1001),
    "59.94": Fraction(60000, 1001),
    "119.88": Fraction(120000, 1001),
}
# AppendToTimeline takes "trackIndex"/"recordFrame" in a clipInfo from the 2024-04 README (Resolve 19) on.
_PLACEMENT_MAJOR_VERSION = 19


class ScriptError(Exception):
    """Something the editor must be told about; its text is shown in Resolve as one message."""


# -- Resolve helpers ----------------------------------------------------------------------------------------
def _method(obj, name):
    """A Resolve method, or None where this version lacks it (e.g. GetSelectedClips before Resolve 21)."""
    try:
        return getattr(obj, name, None)
    except Exception:  # a scripting proxy may raise anything for an unknown name
        return None


def parse_rate(text):
    """A Resolve frame-rate string ("25", "29.97", "29.97 DF", "23.976") as an exact Fraction."""
    words = str(text or "").split()  # "29.97 DF": the drop-frame flag does not change the rate
    value = words[0] if words else ""
    if not value:
        raise ScriptError("Resolve reported no frame rate for the clip or timeline")
    if value in _NTSC_RATES:
        return _NTSC_RATES[value]
    try:
        rate = Fraction(value)
    except ValueError:
        raise ScriptError(f"Resolve reported the frame rate {text!r}, which is not a number") from None
    if rate <= 0:
        raise ScriptError(f"Resolve reported the frame rate {text!r}")
    return rate


def _items_on_track(timeline, track_type, index):
    return timeline.GetItemListInTrack(track_type, index) or []


def _track_count(timeline, track_type):
    count = timeline.GetTrackCount(track_type)
    return int(count) if count else 0


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
    get_selected = _method(timeline, "GetSelectedClips")
    if get_selected is not None:
        selected = get_selected() or []
        on_video = [(item, _video_track_of(timeline, item)) for item in selected]
        on_video = [(item, track) for item, track in on_video if track is not None]
        if len(on_video) > 1:
            raise ScriptError(f"{len(on_video)} video clips are selected; select just the one to re-dub")
        if on_video:
            return on_video[0]
    item = timeline.GetCurrentVideoItem()
    track = _video_track_of(timeline, item) if item else None
    if track is None:
        raise ScriptError(
            "No clip to re-dub: select a video clip on the Edit page, or park the playhead on one"
        )
    return item, track


class Shot:
    """What the re-dub needs to know about the timeline item: source file, used source range, rates."""

    def __init__(self, project, item, track):
        self.item = item
        self.track = track
        media = item.GetMediaPoolItem()
        if not media:
            raise ScriptError(f"The clip '{item.GetName()}' has no source media (a title or generator?)")
        self.path = media.GetClipProperty("File Path") or ""
        if not self.path or not os.path.isfile(self.path):
            raise ScriptError(f"The source file of '{item.GetName()}' is not available here: {self.path!r}")
        self.fps_text = str(media.GetClipProperty("FPS") or "")
        self.rate = parse_rate(self.fps_text)
        self.timeline_rate = parse_rate(project.GetSetting("timelineFrameRate"))
        self.record_start = item.GetStart()
        self.record_duration = item.GetDuration()
        if self.record_start is None or not self.record_duration:
            raise ScriptError(f"Resolve did not report where '{item.GetName()}' sits on the timeline")
        self.start, self.end = self._source_range()
        if self.end <= self.start:
            raise ScriptError(f"The clip '{item.GetName()}' uses no source frames")

    def _source_range(self):
        """Source frames [start, end) of the clip the item plays, in the clip's own frame rate."""
        get_start = _method(self.item, "GetSourceStartFrame")
        get_end = _method(self.item, "GetSourceEndFrame")
        if get_start is not None and get_end is not None:  # Resolve 19.1+
            start, end = get_start(), get_end()
            if start is not None and end is not None:
                return int(start), int(end)
        # Older Resolve: the left offset counts source frames; the duration counts timeline frames.
        left = self.item.GetLeftOffset()
        if left is None:
            raise ScriptError(f"Resolve did not report the source range of '{self.item.GetName()}'")
        frames = Fraction(int(self.record_duration)) * self.rate / self.timeline_rate
        return int(left), int(left) + int(round(frames))


def audio_tracks_under(timeline, shot):
    """Audio tracks holding a clip under the shot's first frame: [(track index, name, timeline item)]."""
    found = []
    for track in range(1, _track_count(timeline, "audio") + 1):
        for item in _items_on_track(timeline, "audio", track):
            if item.GetStart() <= shot.record_start < item.GetEnd():
                name = timeline.GetTrackName("audio", track) or f"A{track}"
                found.append((track, name, item))
                break
    return found


def audio_from_track_item(project, shot, item):
    """The audio file of a timeline audio clip and the second in it that plays at the shot's first frame."""
    media = item.GetMediaPoolItem()
    path = media.GetClipProperty("File Path") if media else None
    if not path:
        raise ScriptError(f"The audio clip '{item.GetName()}' has no source file")
    timeline_rate = shot.timeline_rate
    get_start = _method(item, "GetSourceStartFrame")
    start_frame = get_start() if get_start is not None else None
    if start_frame is not None:  # counted in the audio clip's own rate
        head = Fraction(int(start_frame)) / parse_rate(media.GetClipProperty("FPS"))
    else:  # older Resolve: the left offset counts timeline frames on an audio item
        head = Fraction(int(item.GetLeftOffset() or 0)) / timeline_rate
    offset = head + Fraction(int(shot.record_start) - int(item.GetStart())) / timeline_rate
    return path, offset


def retalk_bin(media_pool):
    """The media pool's "retalk" bin, made under the root folder on first use."""
    root = media_pool.GetRootFolder()
    if not root:
        raise ScriptError("Resolve did not give access to the media pool's root bin")
    for folder in root.GetSubFolderList() or []:
        if folder.GetName() == BIN_NAME:
            return folder
    folder = media_pool.AddSubFolder(root, BIN_NAME)
    if not folder:
        raise ScriptError(f"Resolve could not make the '{BIN_NAME}' bin in the media pool")
    return folder


def import_result(media_pool, path):
    """Import the result file into the retalk bin; returns its media pool item."""
    folder = retalk_bin(media_pool)
    previous = media_pool.GetCurrentFolder()
    if not media_pool.SetCurrentFolder(folder):
        raise ScriptError(f"Resolve could not open the '{BIN_NAME}' bin; the re-dub is at {path}")
    try:
        items = media_pool.ImportMedia([path]) or []
    finally:
        if previous:
            media_pool.SetCurrentFolder(previous)
    if not items:
        raise ScriptError(f"Resolve could not import the re-dub; it is at {path}")
    return items[0]


def add_as_take(item, media, frames):
    """Add ``media`` (frames 0..frames) as a take of ``item`` and select it; returns the take's index, or None
    where Resolve refuses the take."""
    if not item.AddTake(media, 0, frames):
        return None
    index = item.GetTakesCount()
    take = item.GetTakeByIndex(index) if index else None
    if not take or not _same_media(take.get("mediaPoolItem"), media):
        raise ScriptError("Resolve accepted the take but does not list it; the re-dub is in the retalk bin")
    if not item.SelectTakeByIndex(index):
        raise ScriptError(
            f"Added the re-dub as take {index}, but Resolve did not select it: pick it in the take selector"
        )
    return index


def _same_media(a, b):
    return a is not None and (a is b or a.GetMediaId() == b.GetMediaId())


def place_above(resolve, timeline, media_pool, shot, media, frames):
    """Put ``media`` on the first free video track above the shot at its record frame; returns the track or None."""
    version = resolve.GetVersion() or [0]
    if int(version[0]) < _PLACEMENT_MAJOR_VERSION:
        return None
    record_end = int(shot.record_start) + int(shot.record_duration)
    track = shot.track + 1
    while track <= _track_count(timeline, "video"):
        busy = [
            other
            for other in _items_on_track(timeline, "video", track)
            if other.GetStart() < record_end and other.GetEnd() > shot.record_start
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
        "recordFrame": shot.record_start,
    }
    placed = media_pool.AppendToTimeline([clip_info]) or []
    if len(placed) != 1 or placed[0].GetStart() != shot.record_start:
        if placed:
            timeline.DeleteClips(placed)
        return None
    return track


# -- the bridge -----------------------------------------------------------------------------------------------
class Bridge:
    """The retalk-side helper process; JSON lines both ways (see retalk/commands/resolve.py)."""

    def __init__(self, python, request):
        if not python or not os.path.isfile(python):
            raise ScriptError(
                "retalk is not wired to this script: run `retalk resolve install` in retalk's environment"
            )
        self.events = queue.Queue()
        self.log = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                [python, "-m", "retalk.commands.resolve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window on Windows
            )
        except OSError as err:
            raise ScriptError(f"could not start retalk ({python}): {err}") from None
        self._send(request)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, obj):
        try:
            self.process.stdin.write((json.dumps(obj) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except (OSError, ValueError):  # the bridge has already exited; its last words say why
            pass

    def _read(self):
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line.decode("utf-8")))
            except ValueError:
                continue
        self.process.wait()
        self.log.seek(0)
        reason = self.log.read().decode("utf-8", "replace").strip().splitlines()
        self.events.put({"event": "exit", "message": reason[-1] if reason else ""})

    def cancel(self):
        self._send({"cancel": True})

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reader.join(timeout=10)  # it reads the log last
        self.log.close()


class Tracker:
    """Turns bridge events into a status line and a fraction for a progress display; the UI drives step()."""

    def __init__(self, bridge):
        self.bridge = bridge
        self.text = "Connecting to retalk..."
        self.fraction = 0.0
        self.cancel_requested = False

    def cancel(self):
        if not self.cancel_requested:
            self.cancel_requested = True
            self.text = "Cancelling..."
            self.bridge.cancel()

    def step(self, wait=0.1):
        """Handle the bridge's events; returns the final event (done / error / cancelled) or None."""
        try:
            event = self.bridge.events.get(timeout=wait)
        except queue.Empty:
            return None
        while True:
            kind = event.get("event")
            if kind in ("done", "error", "cancelled"):
                return event
            if kind == "exit":
                reason = event.get("message") or "no reason given"
                return {"event": "error", "message": "retalk stopped unexpectedly: " + reason}
            if kind == "accepted":
                self.text = "Queued on the retalk server (job {})".format(event["job"])
            elif kind == "progress" and not self.cancel_requested:
                self.text, self.fraction = describe_progress(event)
            try:
                event = self.bridge.events.get_nowait()
            except queue.Empty:
                return None


def describe_progress(event):
    state, stage = event.get("state", ""), event.get("stage") or ""
    done, total = event.get("done") or 0, event.get("total") or 0
    if state == "queued":
        return "Waiting in the retalk queue...", 0.0
    text = f"Re-dubbing: {stage} {done}/{total}" if stage else "Re-dubbing..."
    if event.get("eta") is not None:
        text += " (about {:.0f} s left)".format(event["eta"])
    return text, (float(done) / total if total else 0.0)


# -- user interface -------------------------------------------------------------------------------------------
class ConsoleUI:
    """Plain fallback where Fusion's UIManager is missing: messages go to Workspace > Console; no dialog, so
    the replacement audio is the clip on the highest audio track under the shot."""

    def ask(self, shot, audio_tracks):
        if not audio_tracks:
            self.message(
                "no dialog is available in this Resolve; put the replacement audio on an audio track "
                "under the shot's first frame and run the script again"
            )
            return None
        track, name, _ = audio_tracks[-1]
        print(f"retalk: using the audio on {name} (track A{track})")
        return {
            "audio_track": track,
            "engine": "auto",
            "expression": "neutral",
            "face": "largest",
            "codec": "prores",
        }

    def run_progress(self, tracker):
        shown = None
        while True:
            final = tracker.step(wait=0.5)
            if final is not None:
                return final
            if tracker.text != shown:
                shown = tracker.text
                print("retalk: " + shown)

    def message(self, text):
        print("retalk: " + text)


class FusionUI:
    """Dialogs built with Fusion's UIManager (fusion.UIManager, bmd.UIDispatcher)."""

    @staticmethod
    def available(fusion, bmd):
        """Whether this host offers UIManager dialogs; where it does not, messages go to the console."""
        return fusion is not None and bmd is not None and _method(fusion, "UIManager") is not None

    def __init__(self, fusion, bmd):
        self.fusion = fusion
        self.ui = fusion.UIManager
        self.dispatcher = bmd.UIDispatcher(self.ui)

    def _window(self, title, rows, height):
        window = self.dispatcher.AddWindow(
            {"ID": "RetalkWindow", "WindowTitle": title, "Geometry": [300, 300, 560, height]},
            self.ui.VGroup(rows),
        )
        window.On.RetalkWindow.Close = lambda event: self.dispatcher.ExitLoop()
        return window

    def _row(self, label, widget):
        return self.ui.HGroup([self.ui.Label({"Text": label, "Weight": 0.25}), widget])

    def ask(self, shot, audio_tracks):
        ui = self.ui
        title = f"Re-dub '{shot.item.GetName()}' (source frames {shot.start}-{shot.end - 1})"
        window = self._window(
            "Re-dub with retalk",
            [
                ui.Label({"Text": title}),
                self._row("Audio", ui.ComboBox({"ID": "Source"})),
                self._row(
                    "File",
                    ui.HGroup([ui.LineEdit({"ID": "File"}), ui.Button({"ID": "Browse", "Text": "..."})]),
                ),
                self._row("Engine", ui.ComboBox({"ID": "Engine"})),
                self._row("Expression", ui.ComboBox({"ID": "Expression"})),
                self._row("Face", ui.LineEdit({"ID": "Face", "Text": "largest"})),
                self._row("Codec", ui.ComboBox({"ID": "Codec"})),
                ui.HGroup(
                    [
                        ui.Button({"ID": "Cancel", "Text": "Cancel"}),
                        ui.Button({"ID": "Run", "Text": "Re-dub"}),
                    ]
                ),
            ],
            300,
        )
        items = window.GetItems()
        sources = ["Audio file"] + [f"{name} (A{track})" for track, name, _ in audio_tracks]
        for box, values in (
            ("Source", sources),
            ("Engine", ENGINES),
            ("Expression", EXPRESSIONS),
            ("Codec", CODECS),
        ):
            for value in values:
                items[box].AddItem(value)
        if audio_tracks:
            items["Source"].CurrentIndex = len(audio_tracks)
        answer = {}

        def on_browse(event):
            path = self.fusion.RequestFile()
            if path:
                items["File"].Text = path

        def on_run(event):
            source = items["Source"].CurrentIndex
            if source == 0:
                answer["audio_file"] = items["File"].Text
            else:
                answer["audio_track"] = audio_tracks[source - 1][0]
            answer["engine"] = items["Engine"].CurrentText
            answer["expression"] = items["Expression"].CurrentText
            answer["face"] = items["Face"].Text or "largest"
            answer["codec"] = items["Codec"].CurrentText
            self.dispatcher.ExitLoop()

        window.On.Browse.Clicked = on_browse
        window.On.Run.Clicked = on_run
        window.On.Cancel.Clicked = lambda event: self.dispatcher.ExitLoop()
        window.Show()
        self.dispatcher.RunLoop()
        window.Hide()
        return answer or None

    def run_progress(self, tracker):
        ui = self.ui
        window = self._window(
            "Re-dubbing with retalk",
            [ui.Label({"ID": "Status", "Text": tracker.text}), ui.Button({"ID": "Cancel", "Text": "Cancel"})],
            110,
        )
        items = window.GetItems()
        timer = ui.Timer({"ID": "Poll", "Interval": 200})
        final = []

        def on_poll(event):
            event = tracker.step(wait=0)
            items["Status"].Text = f"{tracker.text}  {100 * tracker.fraction:.0f}%"
            if event is not None:
                final.append(event)
                timer.Stop()
                self.dispatcher.ExitLoop()

        self.dispatcher.On.Poll.Timeout = on_poll
        window.On.Cancel.Clicked = lambda event: tracker.cancel()
        window.On.RetalkWindow.Close = lambda event: tracker.cancel()
        window.Show()
        timer.Start()
        self.dispatcher.RunLoop()
        window.Hide()
        return final[0]

    def message(self, text):
        ui = self.ui
        window = self._window(
            "retalk", [ui.Label({"Text": text, "WordWrap": True}), ui.Button({"ID": "OK", "Text": "OK"})], 140
        )
        window.On.OK.Clicked = lambda event: self.dispatcher.ExitLoop()
        window.Show()
        self.dispatcher.RunLoop()
        window.Hide()


# -- the re-dub -----------------------------------------------------------------------------------------------
def next_take_number(item):
    """The number the new take will get: the original is take 1 once a take selector exists."""
    return max(int(item.GetTakesCount() or 0), 1) + 1


def redub(resolve, ui):
    """Re-dub the shot and place the result; returns the message for the editor. Raises ScriptError."""
    manager = resolve.GetProjectManager()
    project = manager.GetCurrentProject() if manager else None
    if not project:
        raise ScriptError("Open a project first")
    timeline = project.GetCurrentTimeline()
    if not timeline:
        raise ScriptError("Open a timeline on the Edit page first")
    media_pool = project.GetMediaPool()
    if not media_pool:
        raise ScriptError("Resolve did not give access to the media pool")

    # 1. the shot: clip, source file, range and rates
    item, track = find_shot(timeline)
    shot = Shot(project, item, track)

    # 2. the replacement audio and options
    tracks = audio_tracks_under(timeline, shot)
    answer = ui.ask(shot, tracks)
    if not answer:
        return None
    if answer.get("audio_track"):
        chosen = [entry for entry in tracks if entry[0] == answer["audio_track"]]
        if not chosen:
            raise ScriptError("No audio clip on A{} under the shot".format(answer["audio_track"]))
        audio, offset = audio_from_track_item(project, shot, chosen[0][2])
    else:
        audio, offset = answer.get("audio_file") or "", Fraction(0)
    if not os.path.isfile(audio):
        raise ScriptError(f"The replacement audio file does not exist: {audio!r}")
    if offset < 0:
        raise ScriptError("The audio clip starts after the shot; move it to cover the shot's first frame")

    # 3. the job, through the bridge, with progress and Cancel
    take = next_take_number(item)
    stem = os.path.splitext(os.path.basename(shot.path))[0]
    output = os.path.join(os.path.dirname(shot.path), "retalk", f"{stem}_take{take}")
    request = {
        "server": RETALK_SERVER,
        "connect_timeout": CONNECT_TIMEOUT,
        "clip": shot.path,
        "fps": shot.fps_text,
        "rate": [shot.rate.numerator, shot.rate.denominator],
        "start": shot.start,
        "end": shot.end,
        "audio": audio,
        "audio_offset": [offset.numerator, offset.denominator],
        "engine": answer.get("engine", "auto"),
        "options": {
            "expression": answer.get("expression", "neutral"),
            "face": answer.get("face", "largest"),
            "codec": answer.get("codec", "prores"),
            "fit": "video",  # the take must be exactly as long as the shot
        },
        "output": output,
    }
    bridge = Bridge(RETALK_PYTHON, request)
    try:
        final = ui.run_progress(Tracker(bridge))
    finally:
        bridge.close()
    if final["event"] == "cancelled":
        return "Re-dub cancelled; nothing was added"
    if final["event"] == "error":
        raise ScriptError(final["message"])

    # 4. the result: into the retalk bin, then a take (or the track above, or just the bin)
    path, frames = final["path"], int(final["frames"])
    media = import_result(media_pool, path)
    notes = "".join("\n" + warning for warning in final.get("warnings") or [])
    index = add_as_take(item, media, frames)
    if index is not None:
        return f"Added the re-dub as take {index} of '{item.GetName()}'.{notes}"
    placed = place_above(resolve, timeline, media_pool, shot, media, frames)
    if placed is not None:
        return f"Resolve refused the take; the re-dub is on V{placed} above '{item.GetName()}' at the same frame.{notes}"
    return f"Resolve refused the take; the re-dub is in the '{BIN_NAME}' bin: {os.path.basename(path)}{notes}"


def main(resolve, ui):
    """Run the re-dub; every outcome, failures included, reaches the editor as a message."""
    try:
        text = redub(resolve, ui)
    except ScriptError as err:
        text = str(err)
    if text:
        ui.message(text)


def _host():
    """The Resolve object and the best UI this host offers (menu scripts get `resolve`, `fusion`, `bmd`)."""
    host = globals()
    resolve = host.get("resolve")
    if resolve is None:
        import DaVinciResolveScript  # the README's way in, when run outside the menu

        resolve = DaVinciResolveScript.scriptapp("Resolve")
    fusion = host.get("fusion") or resolve.Fusion()
    bmd = host.get("bmd")
    if FusionUI.available(fusion, bmd):
        return resolve, FusionUI(fusion, bmd)
    return resolve, ConsoleUI()


if __name__ == "__main__":
    main(*_host())

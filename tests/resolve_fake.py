"""A fake DaVinci Resolve object model, built only from the scripting README (plugins/davinci/resolve_api.txt).

Every CamelCase method below is one the README lists for that class, and its docstring quotes the README
line; tests/test_resolve_script.py checks that. Lower-case methods are the tests' own handles for building a
scene. Like Resolve, the fake answers failure with None or False instead of raising. The Python entry calls it
directly; the Lua entry calls it through tests/resolve_entries.py, which converts lists and dicts to and from Lua
tables as Resolve's Lua binding does.

Two versions: ``version=18`` lacks ``Timeline.GetSelectedClips`` (Resolve 21) and
``TimelineItem.GetSourceStartFrame/GetSourceEndFrame`` (19.1), and ignores AppendToTimeline's
``trackIndex``/``recordFrame`` (2024-04 README); ``version=21`` has all of them. Frame ranges are half-open
(an ``endFrame`` is one past the last frame), as Resolve's AppendToTimeline clipInfo is. ``edition`` is
"studio" or "free": what GetProductName answers.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

from retalk import media

_ids = itertools.count(1)
AUDIO_SUFFIXES = (".wav", ".aif", ".aiff", ".mp3", ".flac")


def rate_text(rate: Fraction) -> str:
    """A frame rate the way Resolve shows it: at most 3 decimals ("25", "29.97", "22.131")."""
    return f"{float(rate):.3f}".rstrip("0").rstrip(".")


class MediaPoolItem:
    def __init__(self, path: Path, properties: dict):
        self.path = Path(path)
        self.properties = dict(properties, **{"File Path": str(path), "Clip Name": self.path.name})
        self.media_id = f"media-{next(_ids)}"

    def GetName(self):
        """README MediaPoolItem: GetName() --> string  # Returns the clip name."""
        return self.path.name

    def GetClipProperty(self, propertyName=None):
        """README MediaPoolItem: GetClipProperty(propertyName=None) --> string|dict."""
        if propertyName is None:
            return dict(self.properties)
        return self.properties.get(propertyName, "")  # "an invalid key will return a trivial result"

    def GetMediaId(self):
        """README MediaPoolItem: GetMediaId() --> string  # Returns the unique ID for the MediaPoolItem."""
        return self.media_id

    def GetUniqueId(self):
        """README MediaPoolItem: GetUniqueId() --> string."""
        return self.media_id


class Folder:
    def __init__(self, name: str):
        self.name = name
        self.clips: list[MediaPoolItem] = []
        self.subfolders: list[Folder] = []
        self.unique_id = f"folder-{next(_ids)}"

    def GetName(self):
        """README Folder: GetName() --> string  # Returns the media folder name."""
        return self.name

    def GetClipList(self):
        """README Folder: GetClipList() --> [clips...]."""
        return list(self.clips)

    def GetSubFolderList(self):
        """README Folder: GetSubFolderList() --> [folders...]."""
        return list(self.subfolders)

    def GetUniqueId(self):
        """README Folder: GetUniqueId() --> string."""
        return self.unique_id


class TimelineItem:
    def __init__(self, timeline, media, track_type, track, start, duration, source_start):
        self.timeline = timeline
        self.media = media
        self.track_type = track_type
        self.track = track
        self.start = start  # record frame on the timeline
        self.duration = duration  # timeline frames
        self.source_start = source_start  # in the media's frames
        self.takes: list[dict] = []  # empty: no take selector yet
        self.selected_take = 0
        self.finalized = False
        self.unique_id = f"item-{next(_ids)}"

    def _source_frames(self) -> int:
        media_rate = Fraction(self.media.GetClipProperty("FPS"))
        return round(self.duration * media_rate / self.timeline.rate)

    def GetName(self):
        """README TimelineItem: GetName() --> string  # Returns the item name."""
        return self.media.GetName()

    def GetStart(self, subframe_precision=False):
        """README TimelineItem: GetStart(subframe_precision) --> int/float  # start frame on the timeline."""
        return self.start

    def GetEnd(self, subframe_precision=False):
        """README TimelineItem: GetEnd(subframe_precision) --> int/float  # end frame on the timeline."""
        return self.start + self.duration

    def GetDuration(self, subframe_precision=False):
        """README TimelineItem: GetDuration(subframe_precision) --> int/float  # Returns the item duration."""
        return self.duration

    def GetLeftOffset(self, subframe_precision=False):
        """README TimelineItem: GetLeftOffset(subframe_precision) --> int/float  # maximum extension from the
        left: source frames on a video item; timeline frames on an audio item."""
        if self.track_type == "audio":
            return round(self.source_start / Fraction(self.media.GetClipProperty("FPS")) * self.timeline.rate)
        return self.source_start

    def GetMediaPoolItem(self):
        """README TimelineItem: GetMediaPoolItem() --> MediaPoolItem."""
        return self.media

    def GetUniqueId(self):
        """README TimelineItem: GetUniqueId() --> string  # Returns a unique ID for the timeline item."""
        return self.unique_id

    def AddTake(self, mediaPoolItem, startFrame=None, endFrame=None):
        """README TimelineItem: AddTake(mediaPoolItem, startFrame, endFrame) --> Bool  # Adds mediaPoolItem as
        a new take. Initializes a take selector for the timeline item if needed."""
        if self.timeline.project.takes_refused or not isinstance(mediaPoolItem, MediaPoolItem):
            return False
        frames = int(mediaPoolItem.GetClipProperty("Frames") or 0)
        start = 0 if startFrame is None else startFrame
        end = frames if endFrame is None else endFrame
        if not 0 <= start < end <= frames:
            return False
        if not self.takes:  # the selector starts with the clip itself as take 1
            source_end = self.source_start + self._source_frames()
            self.takes.append(
                {"mediaPoolItem": self.media, "startFrame": self.source_start, "endFrame": source_end}
            )
            self.selected_take = 1
        self.takes.append({"mediaPoolItem": mediaPoolItem, "startFrame": start, "endFrame": end})
        return True

    def GetSelectedTakeIndex(self):
        """README TimelineItem: GetSelectedTakeIndex() --> int  # 0 if the clip is not a take selector."""
        return self.selected_take

    def GetTakesCount(self):
        """README TimelineItem: GetTakesCount() --> int  # 0 if the clip is not a take selector."""
        return len(self.takes)

    def GetTakeByIndex(self, idx):
        """README TimelineItem: GetTakeByIndex(idx) --> {takeInfo...}  # keys "startFrame", "endFrame" and
        "mediaPoolItem"."""
        if not 1 <= idx <= len(self.takes):
            return None
        return dict(self.takes[idx - 1])

    def SelectTakeByIndex(self, idx):
        """README TimelineItem: SelectTakeByIndex(idx) --> Bool  # 1 <= idx <= number of takes."""
        if not 1 <= idx <= len(self.takes):
            return False
        self.selected_take = idx
        return True

    def FinalizeTake(self):
        """README TimelineItem: FinalizeTake() --> Bool  # Finalizes take selection."""
        self.finalized = bool(self.takes)
        return self.finalized


class TimelineItem191(TimelineItem):
    """Resolve 19.1+: the source range readers."""

    def GetSourceStartFrame(self):
        """README TimelineItem: GetSourceStartFrame() --> int  # start frame of the media pool clip."""
        return self.source_start

    def GetSourceEndFrame(self):
        """README TimelineItem: GetSourceEndFrame() --> int  # end frame of the media pool clip (one past)."""
        return self.source_start + self._source_frames()


class Timeline:
    item_class = TimelineItem

    def __init__(self, project, name: str, rate_string: str):
        self.project = project
        self.name = name
        self.rate = Fraction(rate_string.replace("DF", "").strip())
        self.tracks = {"video": [[]], "audio": [[]]}  # one list of items per track, track 1 first
        self.playhead = 0
        self.selection: list[TimelineItem] = []

    # -- the tests' handles --
    def place(self, media, track_type, track, start, duration, source_start=0) -> TimelineItem:
        while len(self.tracks[track_type]) < track:
            self.tracks[track_type].append([])
        item = self.item_class(self, media, track_type, track, start, duration, source_start)
        self.tracks[track_type][track - 1].append(item)
        return item

    def items(self, track_type="video"):
        return [item for track in self.tracks[track_type] for item in track]

    # -- README methods --
    def GetName(self):
        """README Timeline: GetName() --> string  # Returns the timeline name."""
        return self.name

    def GetTrackCount(self, trackType):
        """README Timeline: GetTrackCount(trackType) --> int  # ("audio", "video" or "subtitle")."""
        return len(self.tracks.get(trackType, []))

    def GetItemListInTrack(self, trackType, index):
        """README Timeline: GetItemListInTrack(trackType, index) --> [items...]."""
        tracks = self.tracks.get(trackType, [])
        if not 1 <= index <= len(tracks):
            return None
        return sorted(tracks[index - 1], key=lambda item: item.start)

    def GetTrackName(self, trackType, trackIndex):
        """README Timeline: GetTrackName(trackType, trackIndex) --> string."""
        if not 1 <= trackIndex <= self.GetTrackCount(trackType):
            return None
        return f"{trackType[0].upper()}{trackIndex}"

    def AddTrack(self, trackType, subTrackType=None):
        """README Timeline: AddTrack(trackType, subTrackType) --> Bool  # Adds track of trackType."""
        if trackType not in self.tracks:
            return False
        self.tracks[trackType].append([])
        return True

    def DeleteClips(self, timelineItems, ripple=False):
        """README Timeline: DeleteClips([timelineItems], Bool) --> Bool."""
        for item in timelineItems:
            for track in self.tracks[item.track_type]:
                if item in track:
                    track.remove(item)
        return True

    def GetCurrentVideoItem(self):
        """README Timeline: GetCurrentVideoItem() --> item  # Returns the current video timeline item."""
        for track in reversed(self.tracks["video"]):  # the topmost clip is the one seen
            for item in track:
                if item.start <= self.playhead < item.start + item.duration:
                    return item
        return None

    def GetSetting(self, settingName=None):
        """README Timeline: GetSetting(settingName) --> string."""
        return self.project.GetSetting(settingName)


class Timeline21(Timeline):
    """Resolve 21+: the selection reader; source range readers as in 19.1."""

    item_class = TimelineItem191

    def GetSelectedClips(self):
        """README Timeline: GetSelectedClips() --> [items...]  # Returns the currently selected timeline items."""
        return list(self.selection)


class MediaPool:
    def __init__(self, project):
        self.project = project
        self.root = Folder("Master")
        self.current = self.root

    def GetRootFolder(self):
        """README MediaPool: GetRootFolder() --> Folder  # Returns root Folder of Media Pool."""
        return self.root

    def AddSubFolder(self, folder, name):
        """README MediaPool: AddSubFolder(folder, name) --> Folder."""
        if not isinstance(folder, Folder) or not name:
            return None
        child = Folder(name)
        folder.subfolders.append(child)
        return child

    def GetCurrentFolder(self):
        """README MediaPool: GetCurrentFolder() --> Folder  # Returns currently selected Folder."""
        return self.current

    def SetCurrentFolder(self, Folder_):
        """README MediaPool: SetCurrentFolder(Folder) --> Bool  # Sets current folder by given Folder."""
        if not isinstance(Folder_, Folder):
            return False
        self.current = Folder_
        return True

    def ImportMedia(self, items):
        """README MediaPool: ImportMedia([items...]) --> [MediaPoolItems]  # Imports specified file/folder paths
        into current Media Pool folder."""
        if self.project.import_fails:
            return []
        imported = []
        for path in map(Path, items):
            item = self._read(path)
            if item is not None:
                self.current.clips.append(item)
                imported.append(item)
        return imported

    def _read(self, path: Path) -> MediaPoolItem | None:
        """What Resolve reads from a file; a WAV takes the project's timeline rate at import."""
        if not path.is_file():
            return None
        if path.suffix.lower() in AUDIO_SUFFIXES:
            return MediaPoolItem(path, {"FPS": self.project.GetSetting("timelineFrameRate"), "Type": "Audio"})
        try:
            info = media.probe(path)
        except Exception:
            return None
        return MediaPoolItem(
            path, {"FPS": rate_text(info.rate), "Frames": str(info.frame_count), "Type": "Video"}
        )

    def AppendToTimeline(self, clips):
        """README MediaPool: AppendToTimeline([{clipInfo}, ...]) --> [TimelineItem]  # "mediaPoolItem",
        "startFrame", "endFrame", (optional) "mediaType", "trackIndex" and "recordFrame"."""
        timeline = self.project.timeline
        placed = []
        for info in clips:
            start, end = info.get("startFrame", 0), info.get("endFrame")
            if not isinstance(info.get("mediaPoolItem"), MediaPoolItem) or end is None or end <= start:
                return []
            media_item = info["mediaPoolItem"]
            duration = round((end - start) * timeline.rate / Fraction(media_item.GetClipProperty("FPS")))
            if self.project.version >= 19:
                track, record = info.get("trackIndex", 1), info.get("recordFrame")
            else:  # before the 2024-04 README the two keys do not exist: appended after the last clip on V1
                track, record = 1, None
            if record is None:
                record = max((item.start + item.duration for item in timeline.items()), default=0)
            if not 1 <= track <= timeline.GetTrackCount("video"):
                return []
            placed.append(timeline.place(media_item, "video", track, record, duration, start))
        return placed


class Project:
    def __init__(self, version: int, timeline_rate: str):
        self.version = version
        self.settings = {"timelineFrameRate": timeline_rate}
        self.media_pool = MediaPool(self)
        self.timeline = (Timeline21 if version >= 21 else Timeline)(self, "Timeline 1", timeline_rate)
        self.takes_refused = False
        self.import_fails = False

    def GetName(self):
        """README Project: GetName() --> string  # Returns project name."""
        return "retalk test"

    def GetMediaPool(self):
        """README Project: GetMediaPool() --> MediaPool  # Returns the Media Pool object."""
        return self.media_pool

    def GetCurrentTimeline(self):
        """README Project: GetCurrentTimeline() --> Timeline  # Returns the currently loaded timeline."""
        return self.timeline

    def GetSetting(self, settingName=None):
        """README Project: GetSetting(settingName) --> string  # e.g. "timelineFrameRate": "29.97 DF"."""
        if not settingName:
            return dict(self.settings)
        return self.settings.get(settingName, "")


class ProjectManager:
    def __init__(self, project):
        self.project = project

    def GetCurrentProject(self):
        """README ProjectManager: GetCurrentProject() --> Project  # Returns the currently loaded project."""
        return self.project


class Resolve:
    def __init__(self, version: int = 21, timeline_rate: str = "25", edition: str = "studio"):
        self.version = version
        self.product = "DaVinci Resolve Studio" if edition == "studio" else "DaVinci Resolve"
        self.project = Project(version, timeline_rate)
        self.manager = ProjectManager(self.project)

    def GetProjectManager(self):
        """README Resolve: GetProjectManager() --> ProjectManager."""
        return self.manager

    def GetVersion(self):
        """README Resolve: GetVersion() --> [version fields]  # [major, minor, patch, build, suffix]."""
        return [self.version, 0, 0, 0, ""]

    def GetProductName(self):
        """README Resolve: GetProductName() --> string  # Returns product name."""
        return self.product

    # -- the tests' handles --
    @property
    def timeline(self) -> Timeline:
        return self.project.timeline

    def import_clip(self, path) -> MediaPoolItem:
        """A file in the media pool's root bin, as the editor would have it."""
        items = self.project.media_pool.ImportMedia([str(path)])
        assert items, f"the fake cannot read {path}"
        return items[0]

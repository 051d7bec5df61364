"""The Resolve bridge's dialog (protocol/RESOLVE_BRIDGE.md §5): retalk's own small Tk window, or the console.

Resolve's free edition has no dialog API from 19.1 on (Fusion's UIManager is gone there), so the bridge shows
its own window, the same in every edition: pick the replacement audio and the options, watch the progress,
Cancel, read the outcome. Where no window can open (no display, or a Python without Tk) the console dialog takes
over and says so: it uses the highest audio clip under the shot and the last options, and its progress lines
reach Resolve's console through the entry.

Both dialogs offer the same four calls to the bridge: ``choose``, ``follow``, ``show``, ``close``.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable

from retalk.errors import RetalkError
from retalk.resolve_bridge import (
    DIALOG_OPTIONS,
    AudioClip,
    Choice,
    Events,
    Shot,
    checked_options,
    progress_text,
)

POLL_MS = 100  # how often the window looks at the job's progress
FILE_CHOICE = "Audio file..."


def shot_title(shot: Shot) -> str:
    return f"Re-dub '{shot.clip}' (source frames {shot.start}-{shot.end - 1})"


class ConsoleDialog:
    """No window: the highest audio clip under the shot and the last options; progress as console lines."""

    def __init__(self, events: Events, reason: str):
        self.events = events
        self.reason = reason

    def choose(self, shot: Shot, clips: list[AudioClip], options: dict) -> Choice:
        if not clips:
            raise RetalkError(
                f"retalk cannot open its window here ({self.reason}), so no audio file can be chosen: put the "
                "replacement audio on an audio track under the shot's first frame and run the script again"
            )
        chosen = clips[-1]
        settings = ", ".join(f"{name} {value}" for name, value in options.items())
        self.say(
            f"retalk cannot open its window here ({self.reason}); {shot_title(shot)} with the audio on "
            f"{chosen.describe()} and the last options ({settings}); progress follows here"
        )
        return Choice(options=dict(options), audio_clip=chosen)

    def follow(self, work: Callable[[Callable[[dict], None]], dict], cancel: threading.Event) -> dict:
        """Run the job here; its progress reaches the console as the bridge's status lines."""
        return work(lambda fields: None)

    def say(self, text: str) -> None:
        self.events.emit("status", text=text)

    def show(self, text: str) -> None:
        """Nothing to show: the entry prints every final message to Resolve's console."""

    def close(self) -> None:
        pass


class TkDialog:
    """One small window through the whole run: the choice, then the progress with Cancel, then a message.

    Widgets have fixed names (``.choose.audio``, ``.progress.cancel``, ``.message.ok``, ...): protocol/
    RESOLVE_BRIDGE.md §5 lists them, and the tests drive the window through them.
    """

    def __init__(self, root):
        self.root = root
        self.root.title("Re-dub with retalk")
        self.root.resizable(False, False)
        self.root.protocol("WM_DELETE_WINDOW", self._on_close)
        self.view = None
        self._close_action: Callable[[], None] = self.root.quit

    # -- views ---------------------------------------------------------------------------------------------------
    def _show_view(self, name: str):
        if self.view is not None:
            self.view.destroy()
        from tkinter import ttk

        self.view = ttk.Frame(self.root, name=name, padding=12)
        self.view.grid(sticky="nsew")
        return self.view

    def _raise(self) -> None:
        """Bring the window to the front: it opens from Resolve, behind Resolve's own window."""
        self.root.deiconify()
        self.root.lift()
        self.root.attributes("-topmost", True)
        self.root.after_idle(self.root.attributes, "-topmost", False)

    def _on_close(self) -> None:
        self._close_action()

    def choose(self, shot: Shot, clips: list[AudioClip], options: dict) -> Choice | None:
        # Values live in the widgets, not in Tk variables: a variable's finaliser calls Tcl, which must not
        # happen on the job's thread.
        from tkinter import filedialog, ttk

        view = self._show_view("choose")
        ttk.Label(view, name="title", text=shot_title(shot)).grid(row=0, column=0, columnspan=3, sticky="w")
        sources = [clip.describe() for clip in clips] + [FILE_CHOICE]
        ttk.Label(view, text="Audio").grid(row=1, column=0, sticky="w")
        audio = ttk.Combobox(view, name="audio", values=sources, state="readonly", width=48)
        audio.set(
            sources[-2] if clips else FILE_CHOICE
        )  # the highest audio clip under the shot, as in the console
        audio.grid(row=1, column=1, columnspan=2, sticky="we")
        ttk.Label(view, text="File").grid(row=2, column=0, sticky="w")
        audio_file = ttk.Entry(view, name="file", width=40)
        audio_file.grid(row=2, column=1, sticky="we")

        def browse() -> None:
            path = filedialog.askopenfilename(
                parent=self.root,
                title="Replacement audio",
                filetypes=[("Audio", "*.wav *.aif *.aiff *.flac *.mp3 *.m4a"), ("All files", "*")],
            )
            if path:
                audio_file.delete(0, "end")
                audio_file.insert(0, path)
                audio.set(FILE_CHOICE)

        ttk.Button(view, name="browse", text="Browse...", command=browse).grid(row=2, column=2)
        fields = {}
        for row, option in enumerate(DIALOG_OPTIONS, start=3):
            ttk.Label(view, text=option.label).grid(row=row, column=0, sticky="w")
            value = options.get(option.name, option.default)
            if option.choices is None:
                fields[option.name] = ttk.Entry(view, name=option.name)
                fields[option.name].insert(0, value)
            else:
                fields[option.name] = ttk.Combobox(
                    view, name=option.name, values=option.choices, state="readonly"
                )
                fields[option.name].set(value)
            fields[option.name].grid(row=row, column=1, columnspan=2, sticky="we")
        problem = ttk.Label(view, name="problem", text="", foreground="#b00020")
        problem.grid(row=len(DIALOG_OPTIONS) + 3, column=0, columnspan=3, sticky="w")
        answer: list[Choice] = []

        def start() -> None:
            chosen = dict(zip(sources[:-1], clips, strict=True))
            picked = checked_options({name: field.get().strip() for name, field in fields.items()})
            choice = Choice(
                options=picked, audio_clip=chosen.get(audio.get()), audio_file=audio_file.get().strip()
            )
            if choice.audio_clip is None and not os.path.isfile(choice.audio_file or ""):
                problem.configure(text="Choose the replacement audio: a clip under the shot, or a file")
                return
            answer.append(choice)
            self.root.quit()

        buttons = ttk.Frame(view, name="buttons")
        buttons.grid(row=len(DIALOG_OPTIONS) + 4, column=0, columnspan=3, sticky="e", pady=(8, 0))
        ttk.Button(buttons, name="cancel", text="Cancel", command=self.root.quit).grid(row=0, column=0)
        ttk.Button(buttons, name="redub", text="Re-dub", command=start).grid(row=0, column=1)
        self._close_action = self.root.quit
        self._raise()
        self.root.mainloop()
        return answer[0] if answer else None

    def follow(self, work: Callable[[Callable[[dict], None]], dict], cancel: threading.Event) -> dict:
        from tkinter import ttk

        view = self._show_view("progress")
        status = ttk.Label(view, name="status", text="Connecting to retalk...", width=60)
        status.grid(row=0, column=0, sticky="w")
        bar = ttk.Progressbar(view, name="bar", maximum=1.0, length=420)
        bar.grid(row=1, column=0, pady=8)
        updates: queue.Queue = queue.Queue()
        outcome: list = []

        def press_cancel() -> None:
            cancel.set()
            status.configure(text="Cancelling...")

        cancel_button = ttk.Button(view, name="cancel", text="Cancel", command=press_cancel)
        cancel_button.grid(row=2, column=0, sticky="e")

        def run() -> None:
            try:
                outcome.append(work(updates.put))
            except BaseException as err:  # handed to the window's thread, raised there
                outcome.append(err)

        def poll() -> None:
            while not updates.empty():
                text, fraction = progress_text(updates.get_nowait())
                if not cancel.is_set():
                    status.configure(text=text)
                    bar.configure(value=fraction)
            if outcome:
                self.root.quit()
            else:
                self.root.after(POLL_MS, poll)

        worker = threading.Thread(target=run, name="retalk-job", daemon=True)
        worker.start()
        self._close_action = press_cancel
        self.root.after(POLL_MS, poll)
        self.root.mainloop()
        worker.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def show(self, text: str) -> None:
        from tkinter import ttk

        view = self._show_view("message")
        ttk.Label(view, name="text", text=text, wraplength=460, justify="left").grid(
            row=0, column=0, sticky="w"
        )
        ttk.Button(view, name="ok", text="OK", command=self.root.quit).grid(
            row=1, column=0, sticky="e", pady=(8, 0)
        )
        self._close_action = self.root.quit
        self._raise()
        self.root.mainloop()

    def close(self) -> None:
        self.root.destroy()


def open_dialog(events: Events):
    """The Tk window where one can open; else the console dialog, told why."""
    if sys.platform not in ("win32", "darwin") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return ConsoleDialog(events, "no display: DISPLAY is not set")
    try:
        import tkinter
    except ImportError:
        return ConsoleDialog(events, f"{sys.executable} has no Tk: install it (Debian: python3-tk)")
    try:
        root = tkinter.Tk()
    except tkinter.TclError as err:
        return ConsoleDialog(events, f"Tk cannot open a window: {err}")
    return TkDialog(root)

"""``retalk resolve install|uninstall``, and the bridge the DaVinci Resolve script talks to.

The script (plugins/davinci/) runs under Resolve's own Python, where retalk's packages may not import. It starts
this module with retalk's interpreter (``python -m retalk.commands.resolve``) and exchanges JSON lines with it:

- script -> bridge: one request line (server, clip, fps, start, end exclusive, audio, audio_offset [n, d], engine,
  options, output path without extension, connect_timeout), later optionally ``{"cancel": true}``; end of input
  also cancels.
- bridge -> script: ``accepted`` {job}, ``progress`` {state, stage, done, total, eta}, then one final event:
  ``done`` {path, frames, rate [n, d], warnings}, ``cancelled``, or ``error`` {message} (one line for the editor).

Module-level imports stay light: the CLI imports every command module at start-up.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from retalk.errors import InputError, MediaError, RetalkError

SCRIPT_NAME = "Re-dub with retalk.py"
SCRIPT_TEMPLATE = Path(str(importlib.resources.files("retalk_davinci") / SCRIPT_NAME))  # plugins/davinci/
DEFAULT_SERVER = "tcp://127.0.0.1:7878"
# Resolve shows the clip rate rounded to 3 decimals (22.131 for 1350/61): anything further off is another rate.
RATE_TOLERANCE = Fraction(1, 1000)
_REWATCH_SECONDS = 3.0  # a quiet server: ask for the job's state again (also re-subscribes after a restart)


def register(subparsers: argparse._SubParsersAction) -> None:
    resolve = subparsers.add_parser(
        "resolve", help="install the DaVinci Resolve script (Workspace > Scripts > Edit)"
    )
    actions = resolve.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install", help="copy the script into Resolve's per-user Scripts/Edit folder"
    )
    install.add_argument("--server", default=DEFAULT_SERVER, help="the retalk server the script submits to")
    install.set_defaults(func=run_install)
    uninstall = actions.add_parser("uninstall", help="remove the script")
    uninstall.set_defaults(func=run_uninstall)
    for parser in (install, uninstall):
        parser.add_argument(
            "--scripts-dir", type=Path, help="Resolve's Fusion/Scripts folder (default: the per-user one)"
        )


# -- install / uninstall ----------------------------------------------------------------------------------
def user_scripts_dir(platform: str = sys.platform, environ: dict | None = None) -> Path:
    """Resolve's per-user Fusion/Scripts folder, as its scripting README lists it for each OS."""
    environ = os.environ if environ is None else environ
    if platform == "darwin":
        return Path.home() / "Library/Application Support/Blackmagic Design/DaVinci Resolve/Fusion/Scripts"
    if platform == "win32":
        if not environ.get("APPDATA"):
            raise InputError("%APPDATA% is not set; pass --scripts-dir")
        return (
            Path(environ["APPDATA"])
            / "Blackmagic Design"
            / "DaVinci Resolve"
            / "Support"
            / "Fusion"
            / "Scripts"
        )
    return Path(environ.get("HOME") or Path.home()) / ".local/share/DaVinciResolve/Fusion/Scripts"


def installed_script_text(template: str, python: str, server: str) -> str:
    """The script wired to this installation: the interpreter and the server written into its settings."""
    wired = template
    for name, value in (("RETALK_PYTHON", python), ("RETALK_SERVER", server)):
        lines = [line for line in wired.splitlines(keepends=True) if line.startswith(f"{name} = ")]
        if len(lines) != 1:
            raise RetalkError(f"{SCRIPT_TEMPLATE}: expected one `{name} = ...` line; the script is damaged")
        comment = lines[0].partition("#")[2]
        wired = wired.replace(lines[0], f"{name} = {value!r}  #{comment}", 1)
    return wired


def _edit_folder(args: argparse.Namespace) -> Path:
    return (args.scripts_dir or user_scripts_dir()) / "Edit"


def run_install(args: argparse.Namespace) -> int:
    if not args.server.startswith(("tcp://", "ipc://")):
        raise InputError(f"--server {args.server}: expected tcp://HOST:PORT or ipc://PATH")
    if not SCRIPT_TEMPLATE.is_file():
        raise RetalkError(f"the Resolve script is missing from this installation ({SCRIPT_TEMPLATE})")
    folder = _edit_folder(args)
    text = installed_script_text(SCRIPT_TEMPLATE.read_text(encoding="utf-8"), sys.executable, args.server)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{SCRIPT_NAME}.part"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, folder / SCRIPT_NAME)
    except OSError as err:
        raise RetalkError(f"cannot write into {folder}: {err.strerror}; pass --scripts-dir") from None
    print(f"installed {folder / SCRIPT_NAME}")
    print("in Resolve: Workspace > Scripts > Edit > Re-dub with retalk (restart Resolve if it is not listed)")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    script = _edit_folder(args) / SCRIPT_NAME
    try:
        script.unlink()
    except FileNotFoundError:
        print(f"nothing to remove: {script} is not there")
        return 0
    except OSError as err:
        raise RetalkError(f"cannot remove {script}: {err.strerror}") from None
    print(f"removed {script}")
    return 0


# -- the bridge -------------------------------------------------------------------------------------------
def _emit(event: str, **fields) -> None:
    print(json.dumps(dict(fields, event=event)), flush=True)


def _check_clip(request: dict) -> Fraction:
    """The clip's exact rate, after checking Resolve sees the same rate and range as the file holds."""
    from retalk import media

    info = media.probe(request["clip"])
    resolve_rate = Fraction(request["rate"][0], request["rate"][1])
    if abs(info.rate - resolve_rate) > RATE_TOLERANCE:
        raise InputError(
            f"Resolve plays {Path(request['clip']).name} at {request['fps']} fps but the file is "
            f"{float(info.rate):.3f} fps; reset Clip Attributes > Frame Rate"
        )
    if not 0 <= request["start"] < request["end"] <= info.frame_count:
        raise InputError(
            f"the shot uses source frames {request['start']}-{request['end'] - 1} but the file has "
            f"{info.frame_count} frames"
        )
    return info.rate


def _submit(client, request: dict, rate: Fraction) -> str:
    """SUBMIT naming the files; where the server cannot read them (another machine), upload them first."""
    from retalk_protocol.codec import ProtocolError

    def submit(clip, audio) -> str:
        return client.submit(
            clip,
            audio,
            start=request["start"],
            end=request["end"],
            rate=rate,
            audio_offset=Fraction(*request["audio_offset"]),
            engine=request["engine"],
            options=request["options"],
        )

    try:
        return submit(request["clip"], request["audio"])
    except ProtocolError as err:
        if err.code not in ("forbidden", "not-found"):
            raise
    return submit({"upload": client.upload(request["clip"])}, {"upload": client.upload(request["audio"])})


def _result_path(output: str, codec: str) -> Path:
    """``output`` + the codec's extension, numbered further if a file of that name exists."""
    from retalk import media

    extension = media.default_extension(codec)
    path, copy = Path(output + extension), 2
    while path.exists():
        path, copy = Path(f"{output}-{copy}{extension}"), copy + 1
    return path


def _follow(client, job: str, cancel: threading.Event) -> dict:
    """Relay the job's PROGRESS events until it ends, cancelling it when asked; returns the final event."""
    from retalk_protocol import codec

    current, cancel_sent, last_event, shown = client.watch(job).fields, False, time.monotonic(), None
    while current["state"] not in codec.FINAL_STATES:
        progress = {key: current.get(key) for key in ("state", "stage", "done", "total", "eta")}
        if progress != shown:
            _emit("progress", **progress)
            shown = progress
        if cancel.is_set() and not cancel_sent:
            client.cancel(job)
            cancel_sent = True
        event = client.next_event(timeout=0.2)
        if event is not None and event["job"] == job:
            current, last_event = event.fields, time.monotonic()
        elif time.monotonic() - last_event > _REWATCH_SECONDS:
            current, last_event = client.watch(job).fields, time.monotonic()
    return current


def _run(request: dict, cancel: threading.Event) -> None:
    from retalk_protocol.client import Client
    from retalk_protocol.codec import ProtocolError

    import retalk

    try:
        rate = _check_clip(request)
    except MediaError as err:
        raise MediaError(f"unsupported media: {err}") from None
    server = request["server"]
    client = Client(server, name=f"resolve-plugin/{retalk.__version__}", timeout=request["connect_timeout"])
    try:
        try:
            client.connect()
        except ProtocolError:
            raise RetalkError(
                f"cannot reach the retalk server at {server}; start it with `retalk serve`"
            ) from None
        client.timeout = 120.0  # uploads and fetches of large files
        try:
            job = _submit(client, request, rate)
            _emit("accepted", job=job)
            final = _follow(client, job, cancel)
            if final["state"] == "cancelled":
                _emit("cancelled")
                return
            if final["state"] != "done":
                error = final.get("error") or {}
                raise RetalkError(f"the re-dub failed: {error.get('message', final['state'])}")
            path = _result_path(request["output"], final["result"]["codec"])
            path.parent.mkdir(parents=True, exist_ok=True)
            client.fetch(job, str(path))
        except ProtocolError as err:
            raise RetalkError(f"retalk server {server}: {err.message}") from None
    finally:
        client.close()
    result = final["result"]
    _emit("done", path=str(path), frames=result["frames"], rate=result["rate"], warnings=result["warnings"])


def _watch_input(cancel: threading.Event) -> None:
    """Set ``cancel`` on a cancel line or when the script goes away (end of input)."""
    for line in sys.stdin:
        try:
            if json.loads(line).get("cancel"):
                break
        except (ValueError, AttributeError):
            continue
    cancel.set()


def bridge() -> int:
    try:
        request = json.loads(sys.stdin.readline())
    except ValueError:
        _emit("error", message="the Resolve script sent an unreadable request; reinstall it")
        return 1
    cancel = threading.Event()
    threading.Thread(target=_watch_input, args=(cancel,), daemon=True).start()
    try:
        _run(request, cancel)
    except KeyError as err:
        _emit(
            "error",
            message=f"the Resolve script does not match this retalk ({err}); run `retalk resolve install`",
        )
        return 1
    except RetalkError as err:
        _emit("error", message=str(err))
        return 1
    except OSError as err:
        _emit("error", message=f"retalk could not write the result: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(bridge())

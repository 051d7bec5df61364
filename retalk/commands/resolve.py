"""``retalk resolve install|uninstall``: the DaVinci Resolve menu entries (plugins/davinci/) and their settings.

Two entries do the same thing with the same Resolve calls: ``Re-dub with retalk.lua`` (Lua is built into every
Resolve) and ``Re-dub with retalk.py`` (needs a system Python 3 that Resolve finds; free Resolve lists no Python
scripts from 21.1). Both hand the work to the bridge, :mod:`retalk.resolve_bridge`, whose settings file (server,
CURVE keys) the install writes. Module-level imports stay light: the CLI imports every command module at start-up.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from pathlib import Path

from retalk.commands import add_command
from retalk.errors import InputError, RetalkError
from retalk.resolve_bridge import DEFAULT_SERVER, Settings

TEMPLATES = Path(str(importlib.resources.files("retalk_davinci")))  # plugins/davinci/
LANGUAGES = {"python": "Python", "lua": "Lua"}
# The menu shows the file name without its extension: one entry is "Re-dub with retalk"; two say which is which.
SINGLE_NAMES = {"python": "Re-dub with retalk.py", "lua": "Re-dub with retalk.lua"}
PAIR_NAMES = {"python": "Re-dub with retalk (Python).py", "lua": "Re-dub with retalk (Lua).lua"}
WIRED_LINE = {"python": "RETALK_PYTHON = ", "lua": "local RETALK_PYTHON = "}
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def register(subparsers: argparse._SubParsersAction) -> None:
    resolve = add_command(subparsers, "resolve")
    actions = resolve.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser("install", help="put the entry into Resolve's per-user Scripts/Edit folder")
    install.add_argument("--server", default=DEFAULT_SERVER, help="the retalk server the entry submits to")
    install.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="CURVE keys for a server beyond this machine: DIR/server.key (the server's public key) and this "
        "client's pair NAME.key_secret + NAME.key (from `retalk keys DIR --name NAME`)",
    )
    install.add_argument(
        "--entry",
        choices=("auto", "lua", "python", "both"),
        default="auto",
        help="which entry (default auto: what fits the Resolve an entry last ran in; both before any has run)",
    )
    install.set_defaults(func=run_install)
    uninstall = actions.add_parser("uninstall", help="remove the entries")
    uninstall.set_defaults(func=run_uninstall)
    for parser in (install, uninstall):
        parser.add_argument(
            "--scripts-dir", type=Path, help="Resolve's Fusion/Scripts folder (default: the per-user one)"
        )


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


# -- which entries ---------------------------------------------------------------------------------------------
def entries_for(seen: dict | None) -> tuple[tuple[str, ...], str]:
    """The entries that fit the Resolve an entry last ran in (as the bridge recorded it), and why.

    The edition is read from inside Resolve (GetProductName, GetVersion): from outside, its install does not
    reliably tell the free edition from Studio. Before any entry has run, both are installed.
    """
    if not seen:
        return ("lua", "python"), (
            "no retalk entry has run in Resolve yet, so its edition is unknown: both entries are installed; "
            "run either once, then `retalk resolve install` again keeps the one that fits"
        )
    product = seen.get("product") or "DaVinci Resolve"
    version = ".".join(str(part) for part in (seen.get("version") or [])[:3])
    if "studio" not in product.lower():
        return (
            ("lua",),
            f"{product} {version} is the free edition: Lua entries list in every free version (Python ones not from 21.1)",
        )
    entry = seen.get("entry") if seen.get("entry") in LANGUAGES else "lua"
    return (entry,), f"{product} {version}: the {LANGUAGES[entry]} entry has run there"


def wired_entry(template: str, language: str, python: str) -> str:
    """An entry's text with this installation's interpreter written into its RETALK_PYTHON line."""
    prefix = WIRED_LINE[language]
    lines = [line for line in template.splitlines(keepends=True) if line.startswith(prefix)]
    if len(lines) != 1:
        raise RetalkError(
            f"the {LANGUAGES[language]} entry should have one `{prefix}...` line; reinstall retalk"
        )
    if language == "python":
        value, comment = repr(python), "  #" + lines[0].partition("#")[2]
    else:
        if any(ord(char) < 32 for char in python):
            raise InputError(
                f"{python!r}: an interpreter path with control characters cannot be written into Lua"
            )
        value = '"' + python.replace("\\", "\\\\").replace('"', '\\"') + '"'
        comment = " --" + lines[0].partition("--")[2]
    return template.replace(lines[0], f"{prefix}{value}{comment}", 1)


# -- the server and its keys ----------------------------------------------------------------------------------
def _is_loopback(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    return host.startswith("127.") or host in LOOPBACK_HOSTS


def find_keys(folder: Path) -> dict:
    """The CURVE key files in ``folder``: the server's public key and this client's secret key."""
    import zmq.auth

    server = folder / "server.key"
    if not server.is_file():
        raise InputError(f"--keys {folder}: no server.key in it (copy the server's public key there)")
    secrets = sorted(path for path in folder.glob("*.key_secret") if path.stem != "server")
    if len(secrets) != 1:
        raise InputError(
            f"--keys {folder}: expected one client key pair (NAME.key_secret, from `retalk keys {folder} "
            f"--name NAME`), found {len(secrets)}"
        )
    try:
        zmq.auth.load_certificate(str(server))
        _, secret = zmq.auth.load_certificate(str(secrets[0]))
    except (OSError, ValueError) as err:
        raise InputError(f"--keys {folder}: {err}") from None
    if secret is None:
        raise InputError(f"--keys {folder}: {secrets[0].name} holds no secret key")
    return {"server": str(server.resolve()), "client": str(secrets[0].resolve())}


# -- install / uninstall ---------------------------------------------------------------------------------------
def _edit_folder(args: argparse.Namespace) -> Path:
    return (args.scripts_dir or user_scripts_dir()) / "Edit"


def _write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def run_install(args: argparse.Namespace) -> int:
    if not args.server.startswith(("tcp://", "ipc://")):
        raise InputError(f"--server {args.server}: expected tcp://HOST:PORT or ipc://PATH")
    keys = find_keys(args.keys) if args.keys is not None else None
    if keys is None and not _is_loopback(args.server):
        raise InputError(
            f"--server {args.server} is not on this machine, and a server there requires CURVE: pass --keys DIR "
            "(see `retalk keys`)"
        )
    settings = Settings.load()
    if args.entry == "auto":
        languages, why = entries_for(settings.resolve)
    else:
        languages = ("lua", "python") if args.entry == "both" else (args.entry,)
        why = "as asked (--entry)"
    names = SINGLE_NAMES if len(languages) == 1 else PAIR_NAMES
    folder = _edit_folder(args)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for language in languages:
            template = TEMPLATES / SINGLE_NAMES[language]
            if not template.is_file():
                raise RetalkError(f"the Resolve entry is missing from this installation ({template})")
            text = wired_entry(template.read_text(encoding="utf-8"), language, sys.executable)
            _write(folder / names[language], text)
            print(f"installed {folder / names[language]} ({LANGUAGES[language]} entry)")
        for stale in {*SINGLE_NAMES.values(), *PAIR_NAMES.values()} - {
            names[language] for language in languages
        }:
            if (folder / stale).exists():
                (folder / stale).unlink()
                print(f"removed {folder / stale}")
    except OSError as err:
        raise RetalkError(f"cannot write into {folder}: {err.strerror}; pass --scripts-dir") from None
    print(f"why: {why}")
    settings.server, settings.keys = args.server, keys
    try:
        path = settings.save()
    except OSError as err:
        raise RetalkError(f"cannot write retalk's Resolve settings: {err}") from None
    curve = f"; CURVE with {keys['client']} and the server's {keys['server']}" if keys else ""
    print(f"settings: {path} (server {args.server}{curve})")
    print("in Resolve: Workspace > Scripts > Edit > Re-dub with retalk (restart Resolve if it is not listed)")
    if "python" in languages:
        print("the Python entry lists only where Resolve finds a system Python 3 (see the README)")
    if (
        "lua" in languages
    ):  # reported on free 21.1: menu scripts listed but not run; the Lua console runs them
        print(
            f"if the entry does nothing when chosen, run it from Workspace > Console (Lua): dofile([[{folder / names['lua']}]])"
        )
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    folder = _edit_folder(args)
    removed = 0
    for name in sorted({*SINGLE_NAMES.values(), *PAIR_NAMES.values()}):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise RetalkError(f"cannot remove {folder / name}: {err.strerror}") from None
        print(f"removed {folder / name}")
        removed += 1
    if not removed:
        print(f"nothing to remove: no retalk entry in {folder}")
    return 0

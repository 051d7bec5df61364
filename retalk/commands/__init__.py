"""Sub-commands of the ``retalk`` CLI.

Each module here defines ``register(subparsers)``, which adds its parser(s) and sets ``func`` on them:
``func(args) -> int`` is the exit code. :data:`COMMANDS` lists every command with the module that registers it
and its one-line help, so :mod:`retalk.cli` answers ``retalk --help`` without importing any module (they bring
torch, FFmpeg and the rest) and imports only the module of the command that runs. The modules take their
commands' help from here (``add_command``); tests/test_cli_redub.py checks that each registers exactly its commands.
"""

import argparse

COMMANDS: dict[str, tuple[str, str]] = {
    "redub": ("redub", "re-dub a range of a video with a new line of audio"),
    "demo": ("demo", "re-dub a sample clip that retalk makes itself (no files needed)"),
    "models": ("models", "list, verify, download or synthesise the official checkpoints"),
    "selftest": ("selftest", "check every network against the golden outputs (synthetic weights)"),
    "bench": ("bench", "time each stage and measure peak memory (short vs long clip)"),
    "serve": ("server", "run the render server (binds 127.0.0.1 unless CURVE is set up)"),
    "submit": ("server", "queue a re-dub on the server; prints the job id"),
    "status": ("server", "the server's workers and recent jobs, or one job"),
    "watch": ("server", "follow a job until it ends"),
    "cancel": ("server", "cancel a queued or running job"),
    "fetch": ("server", "download a finished job's file"),
    "keys": ("server", "make a CURVE key pair for the server or a client"),
    "resolve": ("resolve", "install the DaVinci Resolve menu entry (Workspace > Scripts > Edit)"),
}


def add_command(subparsers: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """The sub-parser of command ``name``, with its help from :data:`COMMANDS`."""
    return subparsers.add_parser(name, help=COMMANDS[name][1], **kwargs)

"""The ``retalk`` command: parses the command line and runs one sub-command of :mod:`retalk.commands`.

Only the module of the command that runs is imported; ``retalk --help`` lists the commands from
:data:`retalk.commands.COMMANDS` alone. Any :class:`~retalk.errors.RetalkError` ends the run with a one-line
reason and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from retalk import __version__
from retalk.commands import COMMANDS
from retalk.errors import RetalkError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s full sub-parser (its module registers it, and any siblings it defines);
    every other command is listed by name and help only."""
    parser = argparse.ArgumentParser(
        prog="retalk", description="Audio-driven lip-sync editing of talking-head video."
    )
    parser.add_argument("--version", action="version", version=f"retalk {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(f"retalk.commands.{COMMANDS[command][0]}").register(subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RetalkError as err:
        print(f"retalk: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("retalk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``retalk`` command: discovers the sub-commands in :mod:`retalk.commands` and runs one.

Any :class:`~retalk.errors.RetalkError` ends the run with a one-line reason and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import retalk.commands
from retalk import __version__
from retalk.errors import RetalkError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retalk", description="Audio-driven lip-sync editing of talking-head video."
    )
    parser.add_argument("--version", action="version", version=f"retalk {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(retalk.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"retalk.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

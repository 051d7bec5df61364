"""``retalk models list | verify | fetch | synth DIR``: the official checkpoint files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retalk import checkpoints
from retalk.commands import add_command
from retalk.errors import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--checkpoints",
        type=Path,
        metavar="DIR",
        help=f"checkpoints folder (searched first; also ${checkpoints.ENV_VAR})",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser = add_command(subparsers, "models")
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    actions.add_parser(
        "list", parents=[common], help="the official files, where they come from, which are present"
    ).set_defaults(func=list_command)
    actions.add_parser(
        "verify", parents=[common], help="check every file's layout, keys and shapes"
    ).set_defaults(func=verify_command)
    fetch = actions.add_parser(
        "fetch",
        parents=[common],
        help="download files (default: the required ones, S3FD and FAN) into --checkpoints DIR",
    )
    fetch.add_argument(
        "names", nargs="*", metavar="NAME", help="official file names (default: required ones, S3FD and FAN)"
    )
    fetch.add_argument(
        "--all", action="store_true", help="also the optional files (GANimation, dlib landmarks)"
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    fetch.set_defaults(func=fetch_command)
    synth = actions.add_parser(
        "synth", parents=[common], help="write stand-ins filled by the deterministic weight rule (for tests)"
    )
    synth.add_argument("dest", type=Path, metavar="DIR")
    synth.add_argument("names", nargs="*", metavar="NAME", help="official file names (default: all)")
    synth.set_defaults(func=synth_command)


def list_command(args: argparse.Namespace) -> int:
    rows = []
    for spec in checkpoints.CHECKPOINTS.values():
        try:
            path: Path | None = checkpoints.find_checkpoint(spec.name, args.checkpoints)
        except CheckpointError:
            path = None
        rows.append(
            {
                "name": spec.name,
                "required": spec.required,
                "fetched_by_default": spec.default_download,
                "about": spec.about,
                "purpose": spec.purpose,
                "url": spec.url,
                "path": str(path) if path else None,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "search_dirs": [str(d) for d in checkpoints.search_dirs(args.checkpoints)],
                    "checkpoints": rows,
                }
            )
        )
        return 0
    print("searched: " + ", ".join(str(d) for d in checkpoints.search_dirs(args.checkpoints)))
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        need = "required" if row["required"] else "default" if row["fetched_by_default"] else "optional"
        where = row["path"] or "absent"
        print(
            f"{row['name']:<{width}}  {need:<8}  about {row['about']:<17}  {where}  ({row['purpose']}; {row['url']})"
        )
    return 0


def verify_command(args: argparse.Namespace) -> int:
    results = checkpoints.verify(args.checkpoints)
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        for result in results:
            print(f"{result.status:<10}  {result.message}")
    return 0 if all(r.ok for r in results) else 1


def fetch_command(args: argparse.Namespace) -> int:
    names = args.names or ([*checkpoints.CHECKPOINTS] if args.all else None)
    paths = checkpoints.fetch(names, args.checkpoints, progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps({"paths": [str(p) for p in paths]}))
    else:
        for path in paths:
            print(path)
    return 0


def synth_command(args: argparse.Namespace) -> int:
    skipped: list[str] = []
    paths = checkpoints.synth(args.dest, args.names or None, report=skipped.append)
    if args.json:
        print(json.dumps({"paths": [str(p) for p in paths], "skipped": skipped}))
        return 0
    for line in skipped:
        print(line, file=sys.stderr)
    for path in paths:
        print(path)
    return 0

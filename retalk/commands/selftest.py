"""``retalk selftest``: every network and function against the reference's golden outputs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retalk.device import PRECISIONS

# Filling and loading the synthetic weights dominates the time: the compact set (1.8 GB of weights) took 241 s
# on a 2-core CPU, the full set about as long.
SECONDS_PER_GB = 140


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "selftest", help="check every network against the golden outputs (synthetic weights)"
    )
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="DIR",
        help="folder of golden *.npz, e.g. the full reference set (default: the compact set shipped with retalk)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="check the networks under 16-bit autocast (bf16, or fp16 on CUDA) with a relaxed rel L2 rule",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="write the synthetic checkpoints here and keep them (default: a temporary folder, removed after)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.set_defaults(func=selftest_command)


def selftest_command(args: argparse.Namespace) -> int:
    from retalk.device import check_precision, resolve_device
    from retalk.selftest import format_table, golden_files, rows_to_json, run_selftest, synthetic_bytes

    device = resolve_device(args.device)
    check_precision(device, args.precision)
    files = golden_files(args.golden)
    gigabytes = synthetic_bytes(files) / 1e9
    where = args.keep if args.keep is not None else "a temporary folder (removed after)"
    print(
        f"selftest: {len(files)} golden files on {device}; the synthetic weights take {gigabytes:.1f} GB "
        f"in {where}; about {max(1, round(gigabytes * SECONDS_PER_GB / 60))} min on a 2-core CPU",
        file=sys.stderr,
    )
    rows = run_selftest(
        args.golden,
        args.keep,
        device,
        args.precision,
        on_start=lambda name: print(f"selftest: {name}", file=sys.stderr),
    )
    print(json.dumps(rows_to_json(rows)) if args.json else format_table(rows))
    failed = sum(not r.passed for r in rows)
    if not args.json:
        print(f"{len(rows) - failed} passed, {failed} failed", file=sys.stderr)
    return 1 if failed else 0

"""``retalk selftest``: every network and function against the reference's golden outputs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retalk_protocol.options import JOB_OPTIONS

from retalk.commands import add_command
from retalk.commands.redub import add_device_options

# Filling and loading the synthetic weights dominates the time: the compact set (1.8 GB of weights) took 241 s
# on a 2-core CPU, the full set about as long.
SECONDS_PER_GB = 140


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "selftest")
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="DIR",
        help="folder of golden *.npz, e.g. the full reference set (default: the compact set shipped with retalk)",
    )
    parser.add_argument(
        "--pipeline",
        type=Path,
        metavar="DIR",
        help="check the neural engine stage by stage against a recorded reference run in DIR "
        "(e.g. ../shared/reference/pipeline) instead of the networks against the golden outputs",
    )
    add_device_options(
        parser,
        precision_help="check the networks under 16-bit autocast (bf16, or fp16 on CUDA) "
        "with a relaxed rel L2 rule",
    )
    parser.add_argument(
        "--backend",
        choices=JOB_OPTIONS["backend"].choices,
        default="torch",
        help="run the networks on this backend (openvino: their converted models, checked with the same "
        "tolerances; the conversion adds minutes) (default: torch)",
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
    from retalk.engines.backends import choose_backend
    from retalk.selftest import format_table, golden_files, rows_to_json, run_selftest, synthetic_bytes

    device = resolve_device(args.device)
    check_precision(device, args.precision)
    backend = choose_backend(args.backend, device, args.precision)
    if args.pipeline is not None:
        return _pipeline(args, device)
    files = golden_files(args.golden)
    gigabytes = synthetic_bytes(files) / 1e9
    where = args.keep if args.keep is not None else "a temporary folder (removed after)"
    print(
        f"selftest: {len(files)} golden files on {device} ({backend}); the synthetic weights take {gigabytes:.1f} GB "
        f"in {where}; about {max(1, round(gigabytes * SECONDS_PER_GB / 60))} min on a 2-core CPU",
        file=sys.stderr,
    )
    rows = run_selftest(
        args.golden,
        args.keep,
        device,
        args.precision,
        backend=backend,
        on_start=lambda name: print(f"selftest: {name}", file=sys.stderr),
    )
    print(json.dumps(rows_to_json(rows)) if args.json else format_table(rows))
    failed = sum(not r.passed for r in rows)
    if not args.json:
        print(f"{len(rows) - failed} passed, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _pipeline(args: argparse.Namespace, device) -> int:
    from retalk.selftest import checkpoints_folder
    from retalk.selftest.pipeline import check_pipeline, format_report, report_to_json

    if args.precision != "fp32":
        print(
            "selftest: --pipeline checks fp32 (the recording's tolerances); --precision is ignored",
            file=sys.stderr,
        )
    where = args.keep if args.keep is not None else "a temporary folder (removed after)"
    print(
        "selftest: --pipeline writes the rule-filled weights of the pipeline's networks (about 1.5 GB) in "
        f"{where}, then runs every stage twice (per stage and chained): about 5 min on a 2-core CPU",
        file=sys.stderr,
    )
    with checkpoints_folder(args.keep) as folder:
        report = check_pipeline(
            args.pipeline,
            folder,
            device,
            report=lambda message: print(f"selftest: {message}", file=sys.stderr),
        )
    print(json.dumps(report_to_json(report)) if args.json else format_report(report))
    failed = [r for r in report.rows if not r.passed]
    if not args.json:
        stages = sorted({f"{r.part} {r.stage}" for r in failed})
        print(
            f"{len(report.rows) - len(failed)} passed, {len(failed)} failed"
            + (f" (in {', '.join(stages)})" if stages else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0

"""``retalk selftest``: every network and function against the reference's golden outputs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retalk.device import PRECISIONS, check_precision, resolve_device
from retalk.selftest import default_checkpoints_dir, format_table, rows_to_json, run_selftest


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "selftest", help="check every network against the golden outputs (synthetic weights)"
    )
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="DIR",
        help="folder of golden *.npz (default: ../shared/reference/golden)",
    )
    parser.add_argument(
        "--pipeline",
        type=Path,
        metavar="DIR",
        help="check the neural engine stage by stage against a recorded reference run in DIR "
        "(e.g. ../shared/reference/pipeline) instead of the networks against the golden outputs",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="check the networks under 16-bit autocast (bf16, or fp16 on CUDA) with a relaxed rel L2 rule",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        metavar="DIR",
        help="where to write the synthetic checkpoints (default: user cache)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.set_defaults(func=selftest_command)


def selftest_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_precision(device, args.precision)
    if args.pipeline is not None:
        return _pipeline(args, device)
    rows = run_selftest(
        args.golden,
        args.checkpoints,
        device,
        args.precision,
        on_start=lambda name: print(f"selftest: {name}", file=sys.stderr),
    )
    print(json.dumps(rows_to_json(rows)) if args.json else format_table(rows))
    failed = sum(not r.passed for r in rows)
    if not args.json:
        print(f"{len(rows) - failed} passed, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _pipeline(args: argparse.Namespace, device) -> int:
    from retalk.selftest.pipeline import check_pipeline, format_report, report_to_json

    if args.precision != "fp32":
        print(
            "selftest: --pipeline checks fp32 (the recording's tolerances); --precision is ignored",
            file=sys.stderr,
        )
    report = check_pipeline(
        args.pipeline,
        args.checkpoints if args.checkpoints is not None else default_checkpoints_dir(),
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

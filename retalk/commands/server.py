"""The render server and its client commands: ``serve``, ``keys``, ``status``, ``submit``, ``watch``,
``cancel``, ``fetch`` (protocol: retalk_protocol/PROTOCOL.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

from retalk_protocol import options as job_options

from retalk.commands import add_command
from retalk.device import PRECISIONS
from retalk.errors import InputError, RetalkError

DEFAULT_SERVER = "tcp://127.0.0.1:7878"
_AGE_UNITS = ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = add_command(subparsers, "serve")
    serve.add_argument("--bind", default=DEFAULT_SERVER, help="tcp://HOST:PORT (port 0: any) or ipc://PATH")
    serve.add_argument(
        "--media-root", type=Path, action="append", default=[], help="folder clients may read (repeatable)"
    )
    serve.add_argument(
        "--state-dir", type=Path, help="journal, uploads and results (default: user state dir)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes (each keeps its models loaded)"
    )
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for the workers")
    serve.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="fp32 | bf16 | fp16 (CUDA), for the workers"
    )
    serve.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="runs of a job (the first included) before a dying worker fails it (PROTOCOL.md §8.2)",
    )
    serve.add_argument(
        "--retention", type=float, default=24 * 3600.0, help="seconds finished results are kept"
    )
    serve.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    serve.add_argument(
        "--timeout", type=float, default=10.0, help="seconds of silence before a client is gone"
    )
    serve.add_argument("--max-upload", type=int, default=4 << 30, help="largest upload in bytes")
    serve.add_argument("--server-key", type=Path, help="the server's *.key_secret (from `retalk keys`)")
    serve.add_argument("--allow", type=Path, help="folder of allowed client public *.key files")
    serve.add_argument("--runner", default=None, help="advanced: the job runner as module:function")
    # the render farm (retalk_server.ray_pool; README: Render farm)
    serve.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="render on a Ray cluster: its ADDRESS (default $RAY_ADDRESS, or the cluster `ray start --head` "
        "made here), or `local` to start one on this machine; --workers and --runner do not apply then",
    )
    serve.add_argument(
        "--segment-frames",
        type=int,
        help="with --ray: longer jobs are split into segments of this many frames, rendered in parallel "
        "(default 256)",
    )
    serve.add_argument(
        "--cpus-per-worker",
        type=int,
        default=4,
        help="with --ray on a cluster without GPUs: CPUs of one worker",
    )
    serve.set_defaults(func=run_serve)

    keys = add_command(subparsers, "keys")
    keys.add_argument("folder", type=Path)
    keys.add_argument("--name", default="client", help="file stem: NAME.key (public), NAME.key_secret")
    keys.set_defaults(func=run_keys)

    status = add_command(subparsers, "status")
    _add_client_options(status)
    status.add_argument("job", nargs="?", help="show this job only")
    status.add_argument("--limit", type=int, default=20, help="recent jobs listed (default 20)")
    status.set_defaults(func=run_status)

    submit = add_command(subparsers, "submit")
    _add_client_options(submit)
    submit.add_argument("--video", required=True, help="a path inside the server's media roots (or --upload)")
    submit.add_argument("--audio", required=True)
    submit.add_argument("--upload", action="store_true", help="upload the local files instead of naming them")
    submit.add_argument("--start", type=int, default=0, help="first frame (inclusive)")
    submit.add_argument("--end", type=int, help="end frame (exclusive)")
    submit.add_argument("--rate", help="the clip's frame rate as N/D; the server refuses a different one")
    submit.add_argument("--audio-offset", default="0", help="seconds into the audio where the line starts")
    job_options.add_arguments(submit)
    submit.add_argument("--priority", type=int, default=0, help="higher runs first")
    submit.add_argument("--wait", action="store_true", help="watch the job until it ends")
    submit.set_defaults(func=run_submit)

    watch = add_command(subparsers, "watch")
    _add_client_options(watch)
    watch.add_argument("job")
    watch.set_defaults(func=run_watch)

    cancel = add_command(subparsers, "cancel")
    _add_client_options(cancel)
    cancel.add_argument("job")
    cancel.set_defaults(func=run_cancel)

    fetch = add_command(subparsers, "fetch")
    _add_client_options(fetch)
    fetch.add_argument("job")
    fetch.add_argument("-o", "--output", type=Path, required=True)
    fetch.add_argument("--force", action="store_true", help="replace the output file if it exists")
    fetch.set_defaults(func=run_fetch)


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=os.environ.get("RETALK_SERVER", DEFAULT_SERVER), help="endpoint ($RETALK_SERVER)"
    )
    parser.add_argument("--server-key", type=Path, help="the server's public *.key (turns CURVE on)")
    parser.add_argument("--key", type=Path, help="this client's *.key_secret (with --server-key)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    parser.add_argument("--json", action="store_true", help="machine-readable output (JSON lines)")


# -- server side ---------------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    from retalk_server import Server, ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(
        endpoint=args.bind,
        media_roots=list(args.media_root),
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        max_attempts=args.attempts,
        retention=args.retention,
        heartbeat=args.heartbeat,
        timeout=args.timeout,
        max_upload=args.max_upload,
        secret_key=args.server_key,
        allowed_keys=args.allow,
    )
    if args.state_dir is not None:
        config.state_dir = args.state_dir
    if args.runner is not None:
        config.runner = args.runner
    pool = None
    if args.ray is not None:  # the render farm: Ray is imported only here
        from retalk_server.ray_pool import RayPool

        config.check()  # refused before connecting to a cluster
        pool = RayPool(
            args.ray,
            state_dir=config.state_dir,
            device=config.device,
            precision=config.precision,
            max_attempts=config.max_attempts,
            segment_frames=args.segment_frames,
            cpus_per_worker=args.cpus_per_worker,
        )
    try:
        server = Server(config, pool=pool)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"retalk server listening on {server.endpoint}", flush=True)
    try:
        server.serve(stop)
    finally:
        server.close()
    return 0


def run_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    args.folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(args.folder), args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


# -- client side ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator:
    """A connected client; protocol errors become one-line RetalkErrors. A server that is not running is
    reported within the client's connect timeout (a few seconds), whatever ``--timeout`` is."""
    import zmq.auth
    from retalk_protocol.client import Client
    from retalk_protocol.codec import ProtocolError

    server_key = client_key = None
    if args.server_key is not None:
        server_key, _ = zmq.auth.load_certificate(str(args.server_key))
        if args.key is None:
            raise InputError("--server-key needs --key, this client's *.key_secret listed on the server")
        client_key = zmq.auth.load_certificate(str(args.key))
    try:
        with Client(
            args.server, name="retalk-cli", server_key=server_key, client_key=client_key, timeout=args.timeout
        ) as client:
            yield client
    except ProtocolError as err:
        if err.code == "timeout":
            raise RetalkError(err.message) from None
        raise RetalkError(f"server {args.server}: {err.code}: {err.message}") from None


def _print(args: argparse.Namespace, obj: dict, text: str) -> None:
    print(json.dumps(obj) if args.json else text, flush=True)


def _note(text: str) -> None:
    print(f"retalk: {text}", file=sys.stderr, flush=True)


def _age(seconds: float) -> str:
    for size, unit in _AGE_UNITS:
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return "0s"


def _progress(entry: dict) -> str:
    """A job's progress in a few characters: the stage and how far it is, or the state's own word."""
    if entry.get("stage"):
        return f"{entry['stage']} {entry['done']}/{entry['total']}"
    return "-"


def _worker_line(worker: dict) -> str:
    """A worker of STATUS (§4.5); on a render farm with its node and the output frames it renders."""
    node = f" on {worker['node']}" if worker.get("node") else ""
    segment = f" frames {worker['segment'][0]}-{worker['segment'][1]}" if worker.get("segment") else ""
    activity = worker["job"] or ("idle" if worker["ready"] else "starting")
    return f"worker {worker['id']}{node} pid {worker['pid'] or '-'} {worker['device'] or '-'}: {activity}{segment}"


def run_status(args: argparse.Namespace) -> int:
    if args.job is not None:
        return _job_status(args)
    with _client(args) as client:
        status = client.status()
        jobs = client.list_jobs(limit=max(1, args.limit))
    if args.json:
        print(json.dumps(dict(status, recent_jobs=jobs)), flush=True)
        return 0
    counts = ", ".join(f"{n} {state}" for state, n in sorted(status["jobs"].items())) or "none"
    lines = [
        f"{status['server']} up {_age(status['uptime'])}, {status['clients']} client(s), "
        f"{status['streams']} stream(s); devices: {', '.join(status['devices']) or 'starting'}",
        *map(_worker_line, sorted(status["workers"], key=lambda w: w.get("node", ""))),  # a farm's: by node
        f"jobs: {counts}; queue: {' '.join(status['queue']) or 'empty'}",
    ]
    if jobs:
        lines.append(f"{'JOB':<16}  {'STATE':<9}  {'PROGRESS':<16}  {'AGE':>5}  CLIENT")
        lines += [
            f"{e['job']:<16}  {e['state']:<9}  {_progress(e):<16}  {_age(e['age']):>5}  {e['client']}"
            for e in jobs
        ]
    print("\n".join(lines), flush=True)
    return 0


def _job_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        entries = client.list_jobs(job=args.job, limit=1)
        if not entries:
            raise RetalkError(f"server {args.server}: no job {args.job!r}; `retalk status` lists the jobs")
        current = client.watch(args.job).fields
    entry = dict(entries[0], **current)
    if args.json:
        print(json.dumps(entry), flush=True)
        return 0
    print(
        f"{_progress_line(entry)}\n"
        f"client {entry['client']}, submitted {_age(entry['age'])} ago, attempt {entry['attempt']}\n"
        f"clip {entry['clip']}",
        flush=True,
    )
    if entry["state"] == "done":
        _report_result(args, entry)
    return 0


def _progress_line(event: dict) -> str:
    line = f"{event['job']} {event['state']}"
    if event.get("stage"):
        line += f" {event['stage']} {event['done']}/{event['total']}"
        if event.get("eta") is not None:
            line += f" eta {event['eta']:.0f} s"
    if event.get("error"):
        line += f": {event['error']['message']}"
    return line


def _report_result(args: argparse.Namespace, final: dict) -> None:
    """A finished job's warnings, and the command that fetches its file."""
    from retalk import media

    result = final["result"]
    for warning in result.get("warnings", []):
        _note(f"warning: {warning}")
    server = "" if args.server == DEFAULT_SERVER else f" --server {args.server}"
    output = f"{final['job']}{media.default_extension(result['codec'])}"
    _note(f"fetch the result with: retalk fetch{server} {final['job']} -o {output}")


def _watch(args: argparse.Namespace, client, job: str) -> int:
    final = client.follow(job, on_progress=lambda event: _print(args, event, _progress_line(event)))
    if final["state"] != "done":
        raise RetalkError(_progress_line(final))
    _report_result(args, final)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from retalk_protocol.codec import ProtocolError

    try:
        offset = Fraction(args.audio_offset)
        rate = Fraction(args.rate) if args.rate else None
    except (ValueError, ZeroDivisionError):
        raise InputError(
            f"--audio-offset {args.audio_offset!r} / --rate {args.rate!r}: expected numbers"
        ) from None
    with _client(args) as client:
        try:
            job = client.submit_or_upload(
                args.video,
                args.audio,
                upload="always" if args.upload else "never",
                start=args.start,
                end=args.end,
                rate=rate,
                audio_offset=offset,
                engine=args.engine,
                options=job_options.from_arguments(args),
                priority=args.priority,
            )
        except ProtocolError as err:
            local = Path(args.video).is_file() and Path(args.audio).is_file()
            if err.code not in ("forbidden", "not-found") or not local:
                raise
            raise RetalkError(
                f"server {args.server}: {err.code}: {err.message}; add --upload to send the files instead"
            ) from None
        _print(args, {"job": job}, job)
        return _watch(args, client, job) if args.wait else 0


def run_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch(args, client, args.job)


def run_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.cancel(args.job)
    _print(args, {"job": args.job, "state": state}, f"{args.job} {state}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    output = args.output
    if output.is_dir():
        raise InputError(f"-o {output}: is a folder; give a file name")
    if output.exists() and not args.force:
        raise InputError(f"-o {output}: the file exists; pass --force to replace it")
    if not output.absolute().parent.is_dir():
        raise InputError(f"-o {output}: folder {output.absolute().parent} does not exist")
    with _client(args) as client:
        info = client.fetch(args.job, str(output))
    _print(args, {"job": args.job, "output": str(output), "size": info["size"]}, str(output))
    _note(f"{info['size']} bytes, {info['codec']}")
    return 0

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

from retalk.device import PRECISIONS
from retalk.errors import InputError, RetalkError
from retalk.pipeline.request import CODECS, ENGINES, UPPER_FACE
from retalk.pipeline.segments import DEFAULT_SEGMENT_FRAMES
from retalk.pipeline.timing import EXTEND_MODES, FIT_MODES

DEFAULT_SERVER = "tcp://127.0.0.1:7878"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the render server (binds 127.0.0.1 unless CURVE is set up)"
    )
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
    serve.add_argument("--retries", type=int, default=3, help="runs of a job before a dying worker fails it")
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
        "made here), or `local` to start one on this machine; --workers is then ignored",
    )
    serve.add_argument(
        "--segment-frames",
        type=int,
        default=DEFAULT_SEGMENT_FRAMES,
        help="with --ray: longer jobs are split into segments of this many frames, rendered in parallel",
    )
    serve.add_argument(
        "--cpus-per-worker",
        type=int,
        default=4,
        help="with --ray on a cluster without GPUs: CPUs of one worker",
    )
    serve.set_defaults(func=run_serve)

    keys = subparsers.add_parser("keys", help="make a CURVE key pair for the server or a client")
    keys.add_argument("folder", type=Path)
    keys.add_argument("--name", default="client", help="file stem: NAME.key (public), NAME.key_secret")
    keys.set_defaults(func=run_keys)

    status = subparsers.add_parser("status", help="the server's queue, workers, devices and jobs")
    _add_client_options(status)
    status.set_defaults(func=run_status)

    submit = subparsers.add_parser("submit", help="queue a re-dub on the server; prints the job id")
    _add_client_options(submit)
    submit.add_argument("--video", required=True, help="a path inside the server's media roots (or --upload)")
    submit.add_argument("--audio", required=True)
    submit.add_argument("--upload", action="store_true", help="upload the local files instead of naming them")
    submit.add_argument("--start", type=int, default=0, help="first frame (inclusive)")
    submit.add_argument("--end", type=int, help="end frame (exclusive)")
    submit.add_argument("--rate", help="the clip's frame rate as N/D; the server refuses a different one")
    submit.add_argument("--audio-offset", default="0", help="seconds into the audio where the line starts")
    submit.add_argument("--engine", choices=ENGINES, default="auto")
    submit.add_argument("--expression", default="neutral")
    submit.add_argument("--upper-face", choices=UPPER_FACE, default="none")
    submit.add_argument("--fit", choices=FIT_MODES, default="video")
    submit.add_argument("--extend", choices=EXTEND_MODES, default="loop")
    submit.add_argument("--face", default="largest")
    submit.add_argument("--codec", choices=CODECS, default="h264")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--no-cache", action="store_true")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first")
    submit.add_argument("--wait", action="store_true", help="watch the job until it ends")
    submit.set_defaults(func=run_submit)

    watch = subparsers.add_parser("watch", help="follow a job until it ends")
    _add_client_options(watch)
    watch.add_argument("job")
    watch.set_defaults(func=run_watch)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    _add_client_options(cancel)
    cancel.add_argument("job")
    cancel.set_defaults(func=run_cancel)

    fetch = subparsers.add_parser("fetch", help="download a finished job's file")
    _add_client_options(fetch)
    fetch.add_argument("job")
    fetch.add_argument("-o", "--output", type=Path, required=True)
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
    from retalk_server.workers import DEFAULT_RUNNER

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(
        endpoint=args.bind,
        media_roots=list(args.media_root),
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        runner=args.runner or DEFAULT_RUNNER,
        max_attempts=args.retries,
        retention=args.retention,
        heartbeat=args.heartbeat,
        timeout=args.timeout,
        max_upload=args.max_upload,
        secret_key=args.server_key,
        allowed_keys=args.allow,
    )
    if args.state_dir is not None:
        config.state_dir = args.state_dir
    pool = None
    if args.ray is not None:  # the render farm: Ray is imported only here
        from retalk_server.ray_pool import RayPool

        pool = RayPool(
            args.ray,
            state_dir=config.state_dir,
            device=args.device,
            precision=args.precision,
            segment_frames=args.segment_frames,
            cpus_per_worker=args.cpus_per_worker,
            max_attempts=args.retries,
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
    """A connected client; protocol errors become one-line RetalkErrors."""
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
        raise RetalkError(f"server {args.server}: {err.code}: {err.message}") from None


def _print(args: argparse.Namespace, obj: dict, text: str) -> None:
    print(json.dumps(obj) if args.json else text, flush=True)


def run_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    text = [
        f"{status['server']} up {status['uptime']:.0f} s, {status['clients']} client(s), {status['streams']} stream(s)",
        f"devices: {', '.join(status['devices']) or 'starting'}",
        f"queue: {' '.join(status['queue']) or 'empty'}",
        "jobs: " + (", ".join(f"{n} {state}" for state, n in sorted(status["jobs"].items())) or "none"),
    ]
    for w in sorted(status["workers"], key=lambda w: w.get("node", "")):  # a farm's workers, node by node
        node = f" on {w['node']}" if w.get("node") else ""
        segment = f" frames {w['segment'][0]}-{w['segment'][1]}" if w.get("segment") else ""
        activity = w["job"] or ("idle" if w["ready"] else "starting")
        text.append(f"worker {w['id']}{node} pid {w['pid'] or '-'} {w['device'] or '-'}: {activity}{segment}")
    _print(args, status, "\n".join(text))
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


def _watch(args: argparse.Namespace, client, job: str) -> int:
    final = client.wait(job, on_progress=lambda event: _print(args, event, _progress_line(event)))
    if final["state"] != "done":
        raise RetalkError(_progress_line(final))
    return 0


def run_submit(args: argparse.Namespace) -> int:
    try:
        offset = Fraction(args.audio_offset)
        rate = Fraction(args.rate) if args.rate else None
    except (ValueError, ZeroDivisionError):
        raise InputError(
            f"--audio-offset {args.audio_offset!r} / --rate {args.rate!r}: expected numbers"
        ) from None
    options = {
        "expression": args.expression,
        "upper_face": args.upper_face,
        "fit": args.fit,
        "extend": args.extend,
        "face": args.face,
        "codec": args.codec,
        "seed": args.seed,
        "use_cache": not args.no_cache,
    }
    with _client(args) as client:
        if args.upload:
            clip, audio = {"upload": client.upload(args.video)}, {"upload": client.upload(args.audio)}
        else:  # a local file is named absolutely (the server resolves it inside its media roots)
            clip, audio = (
                str(Path(p).absolute()) if Path(p).exists() else p for p in (args.video, args.audio)
            )
        job = client.submit(
            clip,
            audio,
            start=args.start,
            end=args.end,
            rate=rate,
            audio_offset=offset,
            engine=args.engine,
            options=options,
            priority=args.priority,
        )
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
    with _client(args) as client:
        info = client.fetch(args.job, str(args.output))
    _print(args, {"job": args.job, "output": str(args.output), "size": info["size"]}, str(args.output))
    print(f"{info['size']} bytes, {info['codec']}", file=sys.stderr)
    return 0

"""The server's settings (`retalk serve`'s options) and the checks that refuse an unsafe or senseless set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from retalk.device import check_precision, resolve_device
from retalk.errors import InputError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7878"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    endpoint: str = DEFAULT_ENDPOINT
    media_roots: list[Path] = field(default_factory=list)
    state_dir: Path = field(default_factory=lambda: Path(platformdirs.user_state_dir("retalk")) / "server")
    workers: int = 1
    device: str = "auto"
    precision: str = "fp32"  # the workers' network arithmetic (retalk.device.autocast)
    runner: str = "retalk_server.runner:run_redub"  # module:function a worker runs each job with
    max_attempts: int = 3  # runs of one job, the first included, before a dying worker fails it (§8.2)
    retention: float = 24 * 3600.0  # seconds finished results are kept (§8.4)
    heartbeat: float = 1.0
    timeout: float = 10.0  # a client silent this long is gone (§4.9)
    max_message: int = 64 * 1024 * 1024
    max_upload: int = 4 * 1024 * 1024 * 1024
    chunk: int = 1024 * 1024
    max_credit: int = 16
    max_streams: int = 4  # per session
    max_uploads: int = 4  # unfinished, per session
    max_sessions: int = 1024
    max_queue: int = 10000
    secret_key: Path | None = None  # the server's key_secret file (`retalk keys`): turns CURVE on
    allowed_keys: Path | None = None  # folder of client public .key files admitted by the ZAP handler

    def check(self) -> None:
        """Refuse a configuration that would expose the server unprotected (§2.2) or make no sense."""
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("tcp", "ipc"):
            raise InputError(f"--bind {self.endpoint}: expected tcp://HOST:PORT or ipc://PATH")
        if parts.scheme == "tcp" and parts.hostname not in LOOPBACK_HOSTS and self.secret_key is None:
            raise InputError(
                f"--bind {self.endpoint}: binding beyond 127.0.0.1 requires CURVE; make keys with `retalk keys` "
                "and pass --server-key and --allow"
            )
        if (self.secret_key is None) != (self.allowed_keys is None):
            raise InputError(
                "--server-key and --allow go together: CURVE needs both the key and the allow-list"
            )
        if self.allowed_keys is not None and not Path(self.allowed_keys).is_dir():
            raise InputError(f"--allow {self.allowed_keys}: not a folder of client public keys")
        for root in self.media_roots:
            if not Path(root).is_dir():
                raise InputError(f"--media-root {root}: not a folder")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: at least one worker is needed")
        if self.max_attempts < 1:
            raise InputError(f"--attempts {self.max_attempts}: a job needs at least one run")
        # refuse --device cuda where there is none, or fp16 on a CPU, before any worker starts
        check_precision(resolve_device(self.device), self.precision)

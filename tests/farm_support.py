"""Shared by the render farm tests and benchmarks/farm.py: a private network namespace, a Ray cluster of fake GPU
nodes in it, and a loop that drives a RayPool. No tests here.

Ray advertises the machine's own interface address even when asked for 127.0.0.1, so every Ray process runs
in a network namespace that has only loopback (``unshare -n``; root), with its own PID namespace
(``-p -f --mount-proc``) so every Ray process ends with the command that started them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from retalk_protocol import options as job_options
from retalk_server.spec import JobSpec

NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
OBJECT_STORE = 80 << 20  # bytes a node: the farm passes paths, never frames, through Ray


def job_spec(
    video: Path,
    audio: Path,
    output: Path,
    *,
    end: int | None = None,
    engine: str = "preview",
    codec: str = "lossless",
    backend: str = "auto",
) -> JobSpec:
    """A job as the server hands it to its pool, its folder made as SUBMIT makes it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    options = job_options.complete({"codec": codec, "backend": backend})
    return JobSpec(video=video, audio=audio, output=output, end=end, engine=engine, options=options)


def in_private_network() -> bool:
    """Whether this process's network namespace has only the loopback interface (nothing can leave it)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def run_in_private_network(command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """``command`` in a new network namespace with only loopback up, and a new PID namespace."""
    script = 'ip link set lo up && exec "$@"'
    return subprocess.run([*NAMESPACE, "sh", "-c", script, "farm", *command], **kwargs)


def start_cluster(workers: int, *, gpus: int = 1, cpus: int = 1):
    """A head node that runs no work and ``workers`` nodes of ``gpus`` fake GPUs each, all on 127.0.0.1."""
    if not in_private_network():
        raise RuntimeError("refusing to start Ray outside a private network namespace (see farm_support)")
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [add_node(cluster, gpus=gpus, cpus=cpus) for _ in range(workers)]
    return cluster, nodes


def add_node(cluster, *, gpus: int = 1, cpus: int = 1):
    return cluster.add_node(num_cpus=cpus, num_gpus=gpus, object_store_memory=OBJECT_STORE)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_node(cluster, node) -> None:
    """SIGKILL a node's raylet and every process it started, as a machine that dies would lose them."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in [*_descendants(raylet), raylet]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def ray_start(address: str, *args: str, mount_over: Path | None = None, log: Path) -> subprocess.Popen:
    """A node joining ``address`` the README's way (``ray start --block``); ``mount_over``: a folder this node
    does not see (an empty tmpfs over it, in a mount namespace of its own), like a machine lacking a mount."""
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",  # the `ray` command, of this Python
        "start",
        "--address",
        address,
        "--block",
        "--object-store-memory",
        str(OBJECT_STORE),
        *args,
    ]
    if mount_over is not None:
        script = 'mount -t tmpfs hidden "$0" && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", script, str(mount_over), *command]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=out)


def drive(pool, job_id: str, spec: JobSpec, *, timeout: float, on_poll=None) -> tuple[list, object]:
    """Submit one job and poll the pool until its final event; ``on_poll(pool, events)`` runs every turn.
    Returns every event of the job and the final one."""
    deadline = time.monotonic() + timeout
    while pool.capacity() == 0:
        pool.poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"no farm worker became ready in {timeout} s: {pool.describe()}")
        time.sleep(0.1)
    pool.submit(job_id, spec)
    seen = []
    while time.monotonic() < deadline:
        events = [e for e in pool.poll() if e.job == job_id]
        seen += events
        if on_poll is not None:
            on_poll(pool, events)
        final = [e for e in events if e.kind != "progress"]
        if final:
            return seen, final[0]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout} s; last events: {seen[-5:]}")

"""retalk_server: the render server behind RTP/1 (retalk_protocol/PROTOCOL.md) — sessions and uploads, jobs and
their queue, result streams, the journal and the worker pools."""

from retalk_server.app import Server
from retalk_server.config import ServerConfig
from retalk_server.spec import JobSpec
from retalk_server.workers import ProcessWorkerPool, WorkerEvent, WorkerPool

__all__ = ["JobSpec", "ProcessWorkerPool", "Server", "ServerConfig", "WorkerEvent", "WorkerPool"]

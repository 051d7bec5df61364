"""retalk_server: the render server behind RTP/1 (retalk_protocol/PROTOCOL.md) — queue, journal, workers."""

from retalk_server.app import Server, ServerConfig
from retalk_server.workers import ProcessWorkerPool, WorkerEvent, WorkerPool

__all__ = ["ProcessWorkerPool", "Server", "ServerConfig", "WorkerEvent", "WorkerPool"]

"""retalk_protocol: the RTP/1 wire protocol (PROTOCOL.md), its codec, its client and the job options table.

Python >= 3.8 on pyzmq + msgpack. Submodules are imported where used (``from retalk_protocol import codec``):
the options table alone needs neither.
"""

__all__ = ["client", "codec", "options"]

"""retalk_protocol: the RTP/1 wire protocol (PROTOCOL.md), its codec and its client. Python >= 3.8, pyzmq + msgpack."""

from . import client, codec

__all__ = ["client", "codec"]

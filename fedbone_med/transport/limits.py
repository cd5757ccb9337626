"""Network settings and limits shared by both ends of the gRPC transport.

A site imports these (and :mod:`.grpc_client`) without importing any server code: the gRPC
service and the coordinator behind it are the server's alone.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # 256 MiB per gRPC message
DEFAULT_MAX_FRAME_BYTES = 1 << 30  # 1 GiB per sealed frame (streamed in chunks above the message limit)
FRAME_SLACK = 1 << 20  # the sealed header and the meta tensor around a frame's payload
GRPC_OVERHEAD = 4096  # protobuf framing around the sealed blob
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

def split_address(address: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"server address: expected HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    n = max_message_bytes + GRPC_OVERHEAD
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]

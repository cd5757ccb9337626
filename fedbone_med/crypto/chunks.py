"""Split a sealed blob into pieces under gRPC's message limit, and join them back with bounds checks.

The first chunk starts with the blob's total length (u64, big-endian). ``join_chunks`` refuses a
declared length above ``max_bytes`` before buffering anything, stops as soon as more bytes arrive
than declared, and refuses a short or empty stream. Chunking adds no integrity of its own: the
joined blob is still authenticated by ``Session.open``; these checks bound memory only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .envelope import DEFAULT_MAX_PAYLOAD_BYTES
from .errors import InvalidMessage
from .frame import MAX_HEADER_BYTES

_LEN = struct.Struct(">Q")
MIN_CHUNK = 64
DEFAULT_MAX_BLOB_BYTES = DEFAULT_MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES + 64


def split_chunks(blob: bytes, max_chunk: int) -> list[bytes]:
    """Pieces of at most ``max_chunk`` bytes each; the first carries the total-length prefix."""
    if max_chunk < MIN_CHUNK:
        raise ValueError(f"max_chunk must be at least {MIN_CHUNK} bytes")
    framed = _LEN.pack(len(blob)) + bytes(blob)
    return [framed[i:i + max_chunk] for i in range(0, len(framed), max_chunk)]


def join_chunks(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> bytes:
    """Reassemble ``split_chunks`` output (any iterable, e.g. a gRPC stream). Raises :class:`InvalidMessage`."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or len(first) < _LEN.size:
        raise InvalidMessage("chunking", "missing length prefix")
    (total,) = _LEN.unpack_from(first)
    if total > max_bytes:
        raise InvalidMessage("chunking", "declared length exceeds the limit")
    buf = bytearray(first[_LEN.size:])
    if len(buf) > total:
        raise InvalidMessage("chunking", "more bytes than declared")
    for piece in it:
        if not piece:
            raise InvalidMessage("chunking", "empty chunk")
        if len(buf) + len(piece) > total:
            raise InvalidMessage("chunking", "more bytes than declared")
        buf += piece
    if len(buf) != total:
        raise InvalidMessage("chunking", "fewer bytes than declared")
    return bytes(buf)

"""The frame header of a sealed message, and its strict, bounded binary codec.

A sealed blob is ``version (1 byte) | header length (u32, big-endian) | header | AES-GCM(payload)``.
Everything before the ciphertext is AES-GCM associated data, so it is authenticated (a tampering
proxy cannot change it) but not hidden. The header names the run, round, step, site, direction,
sequence number and kind of message, and for every tensor its wire dtype, its dtype after opening
and its shape. :func:`decode_header` is written for hostile input: every length is checked against
the bytes present and against fixed bounds before anything is allocated, and it never trusts a
count it has not checked. Integers are big-endian in the header; tensor bytes are little-endian.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InvalidMessage

WIRE_VERSION = 1
PREFIX = struct.Struct(">BI")  # version byte, header length
MAX_HEADER_BYTES = 4096
MAX_NAME_BYTES = 256
MAX_TENSORS = 64
MAX_NDIM = 8
MAX_U64 = 2**64 - 1
# The product of a shape's dimensions, each counted as at least 1: bounds what an *empty* tensor
# claims too (a (0, 2**63) shape holds no bytes but cannot be allocated, even empty). Far above any
# tensor a frame can carry (payloads stay below 2 GiB, so below 2**30 elements of 2 bytes).
MAX_EXTENT = 2**40

Direction = Literal["site-to-server", "server-to-site"]
Kind = Literal["forward", "features", "backward", "input-grad"]
SITE_TO_SERVER: Direction = "site-to-server"
SERVER_TO_SITE: Direction = "server-to-site"
DIRECTIONS: tuple[Direction, ...] = (SITE_TO_SERVER, SERVER_TO_SITE)
KINDS: tuple[Kind, ...] = ("forward", "features", "backward", "input-grad")
# Which way each kind of message travels; a frame claiming otherwise is refused.
KIND_DIRECTION: dict[str, Direction] = {
    "forward": SITE_TO_SERVER, "backward": SITE_TO_SERVER,
    "features": SERVER_TO_SITE, "input-grad": SERVER_TO_SITE,
}
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}

_FIXED = struct.Struct(">QQQBBH")  # round, step, sequence, direction, kind, n_tensors


@dataclass(frozen=True)
class TensorSpec:
    """One tensor on the wire: ``wire_dtype`` is what is sent, ``dtype`` what ``open`` returns."""

    dtype: torch.dtype
    wire_dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def extent(self) -> int:
        """The product of the dimensions, each counted as at least 1 (an empty tensor's claimed size)."""
        return math.prod(max(d, 1) for d in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def wire_nbytes(self) -> int:
        return self.numel * self.wire_dtype.itemsize


@dataclass(frozen=True)
class FrameHeader:
    """Who sent what, when. ``seal`` fills ``direction``, ``sequence`` and ``tensors``; leave them unset."""

    run_id: str
    round: int
    step: int
    site: str
    kind: Kind
    direction: Direction | None = None
    sequence: int | None = None
    tensors: tuple[TensorSpec, ...] = ()


def _put_name(out: bytearray, value: str, what: str) -> None:
    raw = value.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"{what} must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
    out += struct.pack(">H", len(raw)) + raw


def encode_header(h: FrameHeader) -> bytes:
    """Serialise a complete header (direction, sequence and tensors set). Raises ``ValueError``."""
    if h.direction not in DIRECTIONS or h.sequence is None or h.kind not in KINDS:
        raise ValueError("header needs a direction, a sequence number and a known kind")
    for v in (h.round, h.step, h.sequence):
        if not 0 <= v <= MAX_U64:
            raise ValueError("round, step and sequence must fit in 64 unsigned bits")
    if len(h.tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message")
    out = bytearray()
    _put_name(out, h.run_id, "run id")
    _put_name(out, h.site, "site name")
    out += _FIXED.pack(h.round, h.step, h.sequence, DIRECTIONS.index(h.direction), KINDS.index(h.kind),
                       len(h.tensors))
    for t in h.tensors:
        if len(t.shape) > MAX_NDIM or any(not 0 <= d <= MAX_U64 for d in t.shape):
            raise ValueError(f"tensors may have at most {MAX_NDIM} dimensions")
        out += struct.pack(">BBB", DTYPES.index(t.wire_dtype), DTYPES.index(t.dtype), len(t.shape))
        out += struct.pack(f">{len(t.shape)}Q", *t.shape)
    if len(out) > MAX_HEADER_BYTES:
        raise ValueError(f"header exceeds {MAX_HEADER_BYTES} bytes")
    return bytes(out)


class _Reader:
    """Bounded cursor over untrusted bytes; any overrun is an ``InvalidMessage('header')``."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidMessage("header", "truncated header")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def name(self) -> str:
        (n,) = struct.unpack(">H", self.take(2))
        if not 1 <= n <= MAX_NAME_BYTES:
            raise InvalidMessage("header", "bad name length")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage("header", "name is not UTF-8") from None


def _code(table: tuple, code: int, what: str):  # type: ignore[no-untyped-def]
    if code >= len(table):
        raise InvalidMessage("header", f"unknown {what}")
    return table[code]


def decode_header(data: bytes) -> FrameHeader:
    """Parse an untrusted header; raises :class:`InvalidMessage` on anything malformed or out of bounds."""
    if len(data) > MAX_HEADER_BYTES:
        raise InvalidMessage("header-size")
    r = _Reader(data)
    run_id, site = r.name(), r.name()
    rnd, step, seq, d, k, n = r.unpack(_FIXED)
    direction: Direction = _code(DIRECTIONS, d, "direction")
    kind: Kind = _code(KINDS, k, "kind")
    if n > MAX_TENSORS:
        raise InvalidMessage("header", "too many tensors")
    specs = []
    for _ in range(n):
        w, o, ndim = struct.unpack(">BBB", r.take(3))
        if ndim > MAX_NDIM:
            raise InvalidMessage("header", "too many dimensions")
        shape = struct.unpack(f">{ndim}Q", r.take(8 * ndim))
        spec = TensorSpec(dtype=_code(DTYPES, o, "dtype"), wire_dtype=_code(DTYPES, w, "dtype"), shape=shape)
        if spec.extent > MAX_EXTENT:  # also an empty tensor with a huge second dimension: it holds no bytes
            raise InvalidMessage("too-large", f"a tensor shape claims more than {MAX_EXTENT} elements "
                                              "(dimensions counted as at least 1)")
        specs.append(spec)
    if r.pos != len(data):
        raise InvalidMessage("header", "trailing bytes")
    if KIND_DIRECTION[kind] != direction:
        raise InvalidMessage("header", "kind does not travel in this direction")
    return FrameHeader(run_id=run_id, round=rnd, step=step, site=site, kind=kind, direction=direction,
                       sequence=seq, tensors=tuple(specs))

"""The sealed envelope: every activation and gradient crossing the cut, end to end between a site and the server.

A :class:`Session` (made by :mod:`.handshake`, one per connection) holds one AES-256-GCM key per
direction. ``seal`` writes a :class:`~.frame.FrameHeader` as associated data and the tensors' raw
little-endian bytes as the encrypted payload (never pickle); ``open`` checks, in this order, the
version byte, the header size, the total size, the header syntax, direction/run/site/sequence,
that the shapes account for exactly the bytes present (all before decrypting or allocating), then
the AES-GCM tag, then kind/round/step expectations, dtypes and that every value is finite.

Protects against, in addition to mutual TLS (which inspecting hospital proxies may terminate):
- eavesdropping (a TLS-terminating proxy sees only ciphertext);
- tampering with any byte of header, payload or tag (one :class:`InvalidMessage`);
- replay and reordering (96-bit nonce = 4-byte direction prefix + 8-byte sequence number; the
  receiver accepts only strictly increasing sequence numbers);
- cross-session reuse (fresh keys per handshake, so a reconnect re-keys) and cross-direction
  reuse (one key per direction, direction in the nonce and in the authenticated header);
- oversized-allocation denial of service (bounded header, ``max_payload_bytes``, shape products
  checked against the byte count before anything is allocated); NaN/Inf poisoning.

Does not protect against: traffic analysis (message sizes and timing leak batch and tensor
shapes; the header's shapes, run, site, round and step are authenticated but *not* encrypted),
a compromised endpoint, or dropped messages (a gap in sequence numbers is accepted; the transport's
timeouts handle loss).

Optional ``wire_dtype`` (``torch.float16`` / ``torch.bfloat16``) halves the bytes of float32
tensors: values are rounded on seal and cast back on open. float16 keeps ~3 significant decimal
digits (relative error <= 2**-11) and overflows above 65504 (seal refuses a finite value that
would become Inf); bfloat16 keeps float32's range but only ~2-3 digits (relative error <= 2**-8).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, replace

import torch
from cryptography.exceptions import InvalidTag

from . import _primitives as prim
from .errors import InvalidMessage, SealError
from .frame import (
    DTYPES,
    KIND_DIRECTION,
    MAX_HEADER_BYTES,
    MAX_U64,
    PREFIX,
    SERVER_TO_SITE,
    SITE_TO_SERVER,
    WIRE_VERSION,
    Direction,
    FrameHeader,
    TensorSpec,
    decode_header,
    encode_header,
)

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB
NONCE_PREFIX: dict[str, bytes] = {SITE_TO_SERVER: b"S>SV", SERVER_TO_SITE: b"SV>S"}
WIRE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Expect:
    """What the receiver is waiting for; ``None`` fields are not checked."""

    kind: str
    round: int | None = None
    step: int | None = None
    count: int | None = None


def _nonce(direction: str, sequence: int) -> bytes:
    return NONCE_PREFIX[direction] + sequence.to_bytes(8, "big")


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise SealError("platform", "the envelope's tensor codec needs a little-endian host")


class Session:
    """One keyed, sequenced channel between a site and the server. Made by :mod:`.handshake`; thread-safe.

    ``role`` is ``"site"`` or ``"server"``: a site seals site-to-server and opens server-to-site.
    """

    def __init__(self, *, role: str, run_id: str, site: str, send_key: bytes, recv_key: bytes,
                 session_id: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if role not in ("site", "server"):
            raise ValueError("role must be 'site' or 'server'")
        if not 0 < max_payload_bytes <= 2**31 - 1 - prim.GCM_TAG_BYTES:
            raise ValueError("max_payload_bytes must be positive and below 2 GiB (AES-GCM message limit)")
        self.role, self.run_id, self.site = role, run_id, site
        self.session_id = session_id  # SHA-256 of the handshake transcript; public, for logs
        self.max_payload_bytes = max_payload_bytes
        self.send_direction: Direction = SITE_TO_SERVER if role == "site" else SERVER_TO_SITE
        self.recv_direction: Direction = SERVER_TO_SITE if role == "site" else SITE_TO_SERVER
        self._send_key, self._recv_key = send_key, recv_key
        self._next_send = 0
        self._last_recv = -1
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show keys
        return f"Session(role={self.role!r}, run_id={self.run_id!r}, site={self.site!r})"

    # -- seal ---------------------------------------------------------------------------------
    def seal(self, header: FrameHeader, tensors: list[torch.Tensor], wire_dtype: torch.dtype | None = None) -> bytes:
        """Encrypt ``tensors`` under this session's send key, binding ``header`` as associated data.

        ``header.direction`` (if set) must be this side's send direction; ``sequence`` and
        ``tensors`` must be unset (seal assigns them). Raises :class:`SealError`.
        """
        _check_little_endian()
        if header.run_id != self.run_id or header.site != self.site:
            raise SealError("session", "header run id or site does not match this session")
        if header.direction not in (None, self.send_direction) or header.sequence is not None or header.tensors:
            raise SealError("header", "direction, sequence and tensors are assigned by seal")
        if KIND_DIRECTION.get(header.kind) != self.send_direction:
            raise SealError("header", f"a {header.kind!r} message cannot be sent by the {self.role}")
        if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
            raise SealError("dtype", "wire_dtype must be torch.float16, torch.bfloat16 or None")
        specs, parts = [], []
        for t in tensors:
            if t.dtype not in DTYPES:
                raise SealError("dtype", "tensors must be float32, float16, bfloat16 or float64")
            t = t.detach().to("cpu").contiguous()
            wire = t if wire_dtype is None else t.to(wire_dtype)
            if wire_dtype is not None and bool(torch.isfinite(t).all()) and not bool(torch.isfinite(wire).all()):
                raise SealError("wire-overflow", f"values overflow {wire_dtype}; send without wire_dtype")
            specs.append(TensorSpec(dtype=t.dtype, wire_dtype=wire.dtype, shape=tuple(t.shape)))
            parts.append(wire.reshape(-1).view(torch.uint8).numpy().tobytes())
        payload = b"".join(parts)
        if len(payload) > self.max_payload_bytes:
            raise SealError("too-large", f"payload exceeds {self.max_payload_bytes} bytes")
        with self._lock:
            seq = self._next_send
            if seq > MAX_U64:
                raise SealError("exhausted", "sequence numbers exhausted; reconnect to re-key")
            full = replace(header, direction=self.send_direction, sequence=seq, tensors=tuple(specs))
            try:
                head = encode_header(full)
            except ValueError as e:
                raise SealError("header", str(e)) from None
            aad = PREFIX.pack(WIRE_VERSION, len(head)) + head
            self._next_send = seq + 1  # consumed even if encryption fails below: never reuse a nonce
            return aad + prim.aead_encrypt(self._send_key, _nonce(self.send_direction, seq), payload, aad)

    # -- open ---------------------------------------------------------------------------------
    def open(self, blob: bytes, expect: Expect | str) -> tuple[FrameHeader, list[torch.Tensor]]:
        """Authenticate, decrypt and validate ``blob``; raises :class:`InvalidMessage` (one type) on any failure."""
        _check_little_endian()
        exp = Expect(kind=expect) if isinstance(expect, str) else expect
        if not isinstance(blob, bytes):
            blob = bytes(blob)
        if len(blob) < PREFIX.size + prim.GCM_TAG_BYTES:
            raise InvalidMessage("truncated")
        version, head_len = PREFIX.unpack_from(blob)
        if version != WIRE_VERSION:
            raise InvalidMessage("version")
        if head_len > MAX_HEADER_BYTES:
            raise InvalidMessage("header-size")
        body_start = PREFIX.size + head_len
        ct_len = len(blob) - body_start - prim.GCM_TAG_BYTES
        if ct_len < 0:
            raise InvalidMessage("truncated")
        if ct_len > self.max_payload_bytes:
            raise InvalidMessage("too-large")
        header = decode_header(blob[PREFIX.size:body_start])
        if header.direction != self.recv_direction:
            raise InvalidMessage("direction")
        if header.run_id != self.run_id or header.site != self.site:
            raise InvalidMessage("session")
        expected_bytes = sum(s.wire_nbytes for s in header.tensors)  # Python ints: no overflow
        if expected_bytes > self.max_payload_bytes:
            raise InvalidMessage("too-large")
        if expected_bytes != ct_len:
            raise InvalidMessage("length")
        seq = header.sequence
        with self._lock:
            if seq is None or seq <= self._last_recv:
                raise InvalidMessage("replay")
            try:
                view = memoryview(blob)  # no copies of a possibly large ciphertext
                payload = prim.aead_decrypt(self._recv_key, _nonce(self.recv_direction, seq),
                                            view[body_start:], view[:body_start])
            except InvalidTag:
                raise InvalidMessage("authentication") from None
            self._last_recv = seq  # authentic: this sequence number is spent even if validation below fails
        self._check_expectation(header, exp)
        return header, _decode_tensors(payload, header.tensors)

    @staticmethod
    def _check_expectation(header: FrameHeader, exp: Expect) -> None:
        if header.kind != exp.kind:
            raise InvalidMessage("unexpected", "wrong message kind")
        if (exp.round is not None and header.round != exp.round) or (exp.step is not None and header.step != exp.step):
            raise InvalidMessage("unexpected", "wrong round or step")
        if exp.count is not None and len(header.tensors) != exp.count:
            raise InvalidMessage("unexpected", "wrong number of tensors")


def _decode_tensors(payload: bytes, specs: tuple[TensorSpec, ...]) -> list[torch.Tensor]:
    buf = bytearray(payload)
    out, offset = [], 0
    for s in specs:
        n = s.wire_nbytes
        if s.numel == 0:
            t = torch.empty(s.shape, dtype=s.wire_dtype)
        else:
            t = torch.frombuffer(buf, dtype=s.wire_dtype, count=s.numel, offset=offset).clone().reshape(s.shape)
        offset += n
        t = t.to(s.dtype)  # checked as the receiver will use it: a finite bfloat16 can overflow float16
        if not bool(torch.isfinite(t).all()):
            raise InvalidMessage("non-finite")
        out.append(t)
    return out

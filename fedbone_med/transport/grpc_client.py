"""``GrpcTransport``: a site's connection to the server over gRPC with mutual TLS and the sealed envelope.

On connect the transport opens a TLS channel with the site's certificate and key (the server checks it
against the project CA, CRL and registry), then runs the Ed25519/X25519 handshake
(:class:`~fedbone_med.crypto.handshake.ClientHandshake`) to get a fresh :class:`~fedbone_med.crypto.envelope.Session`.
:meth:`GrpcTransport.reconnect` opens a new channel and handshakes again, which re-keys. Every Transport
method seals its request (meta JSON + tensors, see :mod:`.wire`), calls one unary RPC with a deadline
(``timeout`` seconds), and opens the reply expecting its type, round and step.

gRPC failures become :class:`RemoteError` (a :class:`~fedbone_med.errors.ProtocolError`) carrying the status
code name and the server's message. A frame whose request or expected reply is larger than one gRPC
message (``max_message_bytes``) travels as a stream of chunks (``ForwardStream`` / ``BackwardStream``);
frames above ``max_frame_bytes`` are refused before sending.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import Tensor

from ..audit.ledger import FrameLedger
from ..crypto.chunks import join_chunks, split_chunks
from ..crypto.envelope import Session
from ..crypto.handshake import ClientHandshake
from ..errors import ProtocolError
from ..models.split import CutSpec
from . import wire
from .base import Transport
from .grpc_service import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES, FRAME_SLACK, grpc_options
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader
from .proto import fedbone_pb2 as pb
from .proto import fedbone_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 660.0  # above the coordinator's default 600 s wait for the other sites


class RemoteError(ProtocolError):
    """A gRPC call failed; ``code`` is the status code name (e.g. ``"PERMISSION_DENIED"``)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method, self.code, self.details = method, code, details


class GrpcTransport(Transport):
    def __init__(self, site: str, address: str, *, ca_pem: bytes | None, cert_pem: bytes | None,
                 key_pem: bytes | None, identity_key: Ed25519PrivateKey, server_public_key: Ed25519PublicKey,
                 run_id: str | None = None, server_name: str = "localhost",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float = DEFAULT_TIMEOUT,
                 insecure_dev: bool = False, ledger: FrameLedger | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.site, self.address = site, address
        self._ca, self._cert, self._key = ca_pem, cert_pem, key_pem
        self._identity, self._server_key = identity_key, server_public_key
        self.run_id = run_id
        self.server_name = server_name
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max(max_frame_bytes, max_message_bytes)
        self.timeout = timeout
        self._cut: CutSpec | None = None
        self._last_z_frame = 0  # bytes of the last forward request: what the backward's reply (dz) is like
        self.insecure_dev = insecure_dev
        self.ledger = ledger  # books every sealed frame exchanged, for the site's audit log
        self.wire_dtype: torch.dtype | None = None  # activations and feature gradients travel as this
        self._channel: grpc.Channel | None = None
        self._session: Session | None = None
        self.connect()

    # -- connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the channel and handshake (a fresh session: new keys, sequence numbers from 0)."""
        options = grpc_options(self.max_message_bytes)
        if self.insecure_dev:
            channel = grpc.insecure_channel(self.address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=self._ca, private_key=self._key,
                                                 certificate_chain=self._cert)
            options.append(("grpc.ssl_target_name_override", self.server_name))
            channel = grpc.secure_channel(self.address, creds, options=options)
        self._channel, self._stub = channel, pb_grpc.FederationStub(channel)
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def reconnect(self) -> None:
        self.close()
        self.connect()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel, self._session = None, None

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: Any) -> Any:
        if self._channel is None:
            raise ProtocolError(f"site {self.site!r}: not connected; call reconnect()")
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else ""
            raise RemoteError(name, code.name if code is not None else "UNKNOWN", details or "") from None

    def _handshake(self) -> None:
        if self.run_id is None:
            self.run_id = self._call("Handshake", pb.HandshakeRequest(site=self.site)).run_id
        hs = ClientHandshake(self._identity, self._server_key, self.run_id, self.site,
                             max_payload_bytes=self.max_frame_bytes)
        reply = self._call("Handshake", pb.HandshakeRequest(site=self.site, client_hello=hs.hello()))
        self._session = hs.finish(reply.server_hello)

    def _exchange(self, rpc: str, type_: str, body: Any, tensors: list[Tensor], reply_type: str, *,
                  round: int = 0, step: int = 0, check_step: bool = False, mode: str = "train",
                  wire_dtype: torch.dtype | None = None) -> tuple[Any, list[Tensor]]:
        session = self._session
        if session is None:
            raise ProtocolError(f"site {self.site!r}: no session; call reconnect()")
        blob = wire.seal_message(session, type_, body, tensors, round=round, step=step, wire_dtype=wire_dtype)
        if len(blob) > self.max_frame_bytes:
            raise ProtocolError(f"site {self.site!r}: a {type_} frame of {len(blob)} bytes exceeds the frame limit "
                                f"of {self.max_frame_bytes} bytes; use a smaller batch")
        tags = wire.ledger_tags(type_, round, mode) if self.ledger is not None else None
        if tags is not None and self.ledger is not None:
            self.ledger.record("up", wire.ledger_type(type_), tags[0], step, blob)
        if max(len(blob), self._expected_reply(type_, tensors, wire_dtype)) <= self.max_message_bytes:
            reply = self._call(rpc, pb.Sealed(site=self.site, sealed=blob))
        elif rpc in ("Forward", "Backward"):
            reply = self._call_stream(f"{rpc}Stream", blob)
        else:
            raise ProtocolError(f"site {self.site!r}: a {type_} frame of {len(blob)} bytes exceeds the message limit "
                                f"of {self.max_message_bytes} bytes")
        if type_ == "forward":
            self._last_z_frame = len(blob)
        _, out_body, out = wire.open_message(session, reply.sealed, reply_type, round=round if check_step else None,
                                             step=step if check_step else None)
        if tags is not None and self.ledger is not None:
            self.ledger.record("down", wire.ledger_type(reply_type), tags[1], step, reply.sealed)
        return out_body, out

    def _expected_reply(self, type_: str, tensors: list[Tensor], wire_dtype: torch.dtype | None) -> int:
        """An upper estimate of the reply's sealed size (to choose a stream before the reply is too big)."""
        item = 4 if wire_dtype is None else 2
        if type_ == "forward" and self._cut is not None and tensors:
            b, _, h, w = tensors[0].shape
            return sum(b * c * -(-h // s) * -(-w // s) * item + 4096
                       for c, s in zip(self._cut.feature_channels, self._cut.feature_strides, strict=True))
        if type_ == "backward":
            return self._last_z_frame
        return 0

    def _call_stream(self, name: str, blob: bytes) -> pb.Sealed:
        if self._channel is None:
            raise ProtocolError(f"site {self.site!r}: not connected; call reconnect()")
        pieces = (pb.Chunk(site=self.site, data=p) for p in split_chunks(blob, self.max_message_bytes))
        try:
            replies = getattr(self._stub, name)(pieces, timeout=self.timeout)
            data = join_chunks((c.data for c in replies), max_bytes=self.max_frame_bytes + FRAME_SLACK)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else ""
            raise RemoteError(name, code.name if code is not None else "UNKNOWN", details or "") from None
        return pb.Sealed(site=self.site, sealed=data)

    # -- Transport -------------------------------------------------------------------------------
    def join(self, request: JoinRequest) -> JoinReply:
        if request.site != self.site:
            raise ProtocolError(f"this transport belongs to site {self.site!r}, not {request.site!r}")
        body, tensors = self._exchange("Join", "join", wire.join_request_to_json(request), [], "join-reply")
        if tensors:
            raise ProtocolError("join reply carries tensors")
        reply = wire.join_reply_from_json(body)
        self._cut = reply.cut
        if reply.run_id != self.run_id:
            raise ProtocolError(f"join reply names run {reply.run_id!r}, the session is for {self.run_id!r}")
        return reply

    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        _, feats = self._exchange("Forward", "forward", wire.step_to_json(header), [z], "features",
                                  round=header.round, step=header.step, check_step=True, mode=header.mode,
                                  wire_dtype=self.wire_dtype)
        return feats

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        _, out = self._exchange("Backward", "backward", wire.step_to_json(header), list(grads), "input-grad",
                                round=header.round, step=header.step, check_step=True, wire_dtype=self.wire_dtype)
        if len(out) != 1:
            raise ProtocolError(f"input-grad reply carries {len(out)} tensors, expected 1")
        return out[0]

    def round_end(self, report: RoundReport) -> None:
        meta, tensors = wire.round_report_to_wire(report)
        self._exchange("RoundEnd", "round-end", meta, tensors, "ok", round=report.round, check_step=True)

    def round_sync(self, site: str, round: int) -> RoundSync:
        if site != self.site:
            raise ProtocolError(f"this transport belongs to site {self.site!r}, not {site!r}")
        body, tensors = self._exchange("RoundSync", "round-sync", None, [], "round-sync-reply", round=round,
                                       check_step=True)
        result = wire.round_sync_from_wire(body, tensors)
        if result.round != round:
            raise ProtocolError(f"round sync answers round {result.round}, asked for {round}")
        return result

    def leave(self, site: str, privacy: Mapping[str, float] | None = None) -> None:
        if site != self.site:
            raise ProtocolError(f"this transport belongs to site {self.site!r}, not {site!r}")
        spent = wire.leave_privacy(privacy)
        self._exchange("Leave", "leave", None if spent is None else {"epsilon": spent[0], "delta": spent[1]}, [],
                       "ok")

"""The gRPC server: the :class:`~fedbone_med.server.coordinator.Coordinator` behind mutual TLS and the sealed envelope.

Every call is authorised twice over. The TLS layer (``require_client_auth=True``) admits only clients with
a certificate signed by the project CA; then each RPC checks the peer certificate with
:func:`~fedbone_med.crypto.identity.verify_peer` (CA, validity, clientAuth, CRL, registry fingerprint) to get
the site name, and refuses a request whose ``site`` names anyone else (a site cannot speak for another).
``Handshake`` takes two calls: the first (no client hello) returns the run id and a fresh challenge (in
``server_hello``) from the service's :class:`~fedbone_med.crypto.handshake.ChallengeBook`; the second runs
:class:`~fedbone_med.crypto.handshake.ServerHandshake` on the client hello, which must be signed by the site's
long-term Ed25519 identity key (``site_keys``: site -> public key, registered with the server by the
operator) and answer that challenge, and keeps the resulting :class:`~fedbone_med.crypto.envelope.Session`.
A hello that fails any check leaves the site's live session as it was; a hello captured on the wire cannot
be used again, neither in this launch nor after a restart (the challenges live in this process only).
Every other RPC opens its sealed frame with that session (authenticated, replay-protected, typed: see
:mod:`.wire`), calls the coordinator and seals the answer.

Worker threads are shared by all sites (``max_workers``), and a call can wait at the coordinator's barrier
for up to its ``wait_timeout``. So that one site cannot occupy them all (and starve the others' handshakes),
each site may have at most ``max_calls_per_site`` sealed calls in flight (default 2: a site makes one call
at a time, plus one left waiting by a call it gave up on); a further one is refused at once with
RESOURCE_EXHAUSTED. A streamed frame (``ForwardStream``, ``BackwardStream``) is admitted (certificate,
session, the per-site bound) before a byte of it is read, so a revoked or unknown peer is refused in
constant memory.

Errors map to gRPC status codes with the error's message (never tensor values): identity and handshake
failures -> PERMISSION_DENIED, no client certificate -> UNAUTHENTICATED, too many calls of one site in flight
-> RESOURCE_EXHAUSTED, a refused frame (``InvalidMessage``) -> INVALID_ARGUMENT ``"invalid message: <reason>"``,
``ProtocolError`` ->
INVALID_ARGUMENT, a site that is no longer a member (dropped, or admitted from the next round) -> ABORTED,
no session yet -> FAILED_PRECONDITION, other ``FedboneError`` -> FAILED_PRECONDITION,
anything else -> INTERNAL with a generic message (details go to the server log only).

``insecure_dev=True`` serves without TLS on loopback only (no certificates: the site named in the request is
taken at its word for routing, but the Ed25519 handshake still authenticates it before any sealed frame).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..audit.ledger import LedgerBook
from ..crypto.chunks import DEFAULT_MAX_BLOB_BYTES, join_chunks, split_chunks
from ..crypto.envelope import Session
from ..crypto.errors import HandshakeError, InvalidMessage
from ..crypto.handshake import ChallengeBook, ServerHandshake
from ..crypto.identity import IdentityError, fingerprint, load_certificate, load_crl, load_registry, verify_peer
from ..errors import ConfigError, FedboneError, ProtocolError, ServerHalted, SiteDropped
from . import wire
from .limits import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    GRPC_OVERHEAD,
    LOOPBACK_HOSTS,
    grpc_options,
    split_address,
)
from .proto import fedbone_pb2 as pb
from .proto import fedbone_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ..server.coordinator import Coordinator

log = logging.getLogger(__name__)

DEFAULT_MAX_CALLS_PER_SITE = 2  # sealed calls of one site in flight at once (handshakes are not counted)
T = TypeVar("T")


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message




class FederationService(pb_grpc.FederationServicer):
    """The ``fedbone.v1.Federation`` service over one coordinator."""

    def __init__(self, coordinator: Coordinator, *, ca_pem: bytes, registry_dir: str | Path,
                 identity_key: Ed25519PrivateKey, site_keys: Mapping[str, Ed25519PublicKey],
                 max_message_bytes: int, insecure_dev: bool = False, ledger: LedgerBook | None = None,
                 peer_fingerprints: dict[str, str] | None = None, wire_dtype: torch.dtype | None = None,
                 max_frame_bytes: int | None = None, max_calls_per_site: int = DEFAULT_MAX_CALLS_PER_SITE) -> None:
        if max_calls_per_site < 1:
            raise ConfigError("max_calls_per_site must be at least 1")
        self.coordinator = coordinator
        # A sealed frame may be larger than one gRPC message: then it is streamed in chunks (ForwardStream,
        # BackwardStream). The session refuses any frame above max_frame_bytes.
        self.max_frame_bytes = max(max_frame_bytes or DEFAULT_MAX_FRAME_BYTES, max_message_bytes)
        # Per request type, no larger frame is decrypted or buffered (derived from the cut: max_batch, max_z_side)
        self.frame_limits = wire.request_frame_limits(coordinator.cut, self.max_frame_bytes)
        self.wire_dtype = wire_dtype  # features and input gradients travel as this (None: float32)
        self.ledger = ledger  # books every sealed frame per site, for the server's audit log
        self.peer_fingerprints = peer_fingerprints if peer_fingerprints is not None else {}
        self.ca = load_certificate(ca_pem)
        self.crl = load_crl(registry_dir)
        self.registry = load_registry(registry_dir)
        self.identity_key = identity_key
        self.site_keys = dict(site_keys)
        self.max_message_bytes = max_message_bytes
        self.insecure_dev = insecure_dev
        self._sessions: dict[str, Session] = {}
        self._challenges = ChallengeBook()  # this launch's handshake challenges: a restart forgets them all
        self.max_calls_per_site = max_calls_per_site
        self._in_flight: dict[str, int] = {}  # site -> sealed calls being served
        self._lock = threading.Lock()

    # -- authorisation ---------------------------------------------------------------------------
    def _certified(self, context: grpc.ServicerContext) -> str | None:
        """The site this call comes from, by its certificate (CA, validity, CRL, registry); ``None`` in
        insecure_dev mode, where there is no certificate. Needs nothing from the request body."""
        if self.insecure_dev:
            return None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        name = verify_peer(pems[0], self.ca, self.crl, self.registry)
        self.peer_fingerprints[name] = fingerprint(pems[0])
        return name

    @staticmethod
    def _claim(certified: str | None, claimed: str) -> str:
        """The site a request speaks for: the one its certificate names (a site cannot speak for another)."""
        if certified is None:  # insecure_dev: taken at its word for routing; the handshake authenticates it
            if not claimed:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "request names no site")
            return claimed
        if certified != claimed:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"the certificate of site {certified!r} cannot speak for site {claimed!r}")
        return certified

    def _peer(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The site this call comes from, by its certificate; must equal the site the request names."""
        return self._claim(self._certified(context), claimed)

    def _session(self, site: str) -> Session:
        with self._lock:
            session = self._sessions.get(site)
        if session is None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f"site {site!r}: no session; call Handshake first")
        return session

    def _enter(self, site: str) -> None:
        """Count a sealed call of ``site`` in flight, or refuse it when the site has too many already.

        Protects against one site holding every worker thread: a call for a future step or round waits at
        the coordinator's barrier (up to its wait timeout), so without a bound one authenticated site could
        park ``max_workers`` calls there and the other sites' handshakes would queue until they time out.
        """
        with self._lock:
            n = self._in_flight.get(site, 0)
            if n >= self.max_calls_per_site:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"site {site!r}: {n} calls already in flight, the limit per site "
                               f"(max_calls_per_site={self.max_calls_per_site}); a site makes one call at a time: "
                               "wait for the earlier calls to finish (or time out), then retry")
            self._in_flight[site] = n + 1

    def _exit(self, site: str) -> None:
        with self._lock:
            n = self._in_flight.get(site, 0) - 1
            if n > 0:
                self._in_flight[site] = n
            else:
                self._in_flight.pop(site, None)

    @contextlib.contextmanager
    def _admitted(self, site: str) -> Iterator[None]:
        self._enter(site)
        try:
            yield
        finally:
            self._exit(site)

    def _run(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        code, message = grpc.StatusCode.INTERNAL, "internal server error"
        try:
            return fn()
        except _Refused as exc:
            code, message = exc.code, exc.message
        except (IdentityError, HandshakeError) as exc:
            code, message = grpc.StatusCode.PERMISSION_DENIED, str(exc)
        except InvalidMessage as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"invalid message: {exc}"
        except SiteDropped as exc:  # not a member (any more): the site should join again
            code, message = grpc.StatusCode.ABORTED, str(exc)
        except ServerHalted as exc:  # a round boundary could not be recorded: retry once the server is back
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except ProtocolError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except FedboneError as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except Exception:
            log.exception("unexpected error in a federation call")
        self._abort(context, code, message)

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    # -- RPCs ------------------------------------------------------------------------------------
    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:  # noqa: N802
        def run() -> pb.HandshakeReply:
            site = self._peer(context, request.site)
            run_id = self.coordinator.run_id
            key = self.site_keys.get(site)
            if key is None:
                raise IdentityError("unregistered", f"site {site!r} has no registered handshake identity key")
            if not request.client_hello:  # the run id, and the challenge the site's signed hello must answer
                return pb.HandshakeReply(run_id=run_id, server_hello=self._challenges.issue(site))
            # Every check (signature, run, site, this launch's unspent challenge) comes before the session is
            # touched: a refused or replayed hello raises here and the site's live session stays as it was.
            hello, session = ServerHandshake(self.identity_key, key, run_id, site, challenges=self._challenges,
                                             max_payload_bytes=self.max_frame_bytes).respond(request.client_hello)
            with self._lock:
                self._sessions[site] = session  # a new handshake re-keys; the old session is dropped
            return pb.HandshakeReply(run_id=run_id, server_hello=hello)

        return self._run(context, run)

    def _sealed(self, request: pb.Sealed, context: grpc.ServicerContext,
                handle: Callable[[str, Session], bytes]) -> pb.Sealed:
        def run() -> pb.Sealed:
            site = self._peer(context, request.site)
            with self._admitted(site):
                return pb.Sealed(site=site, sealed=handle(site, self._session(site)))

        return self._run(context, run)

    def _book(self, site: str, direction: str, msg_type: str, tag: int | None, step: int, frame: bytes) -> None:
        if self.ledger is not None and tag is not None:
            self.ledger.record(site, direction, wire.ledger_type(msg_type), tag, step, frame)

    def _book_request(self, site: str, request: bytes, req_type: str, round: int, step: int = 0,
                      mode: str = "train") -> None:
        """Book an opened request (after the envelope's replay check fixed its place in the order)."""
        tags = wire.ledger_tags(req_type, round, mode)
        self._book(site, "up", req_type, tags[0] if tags else None, step, request)

    def _book_reply(self, site: str, req_type: str, reply: bytes, reply_type: str, round: int, step: int = 0,
                    mode: str = "train") -> bytes:
        """Book a sealed reply; returns it."""
        tags = wire.ledger_tags(req_type, round, mode)
        self._book(site, "down", reply_type, tags[1] if tags else None, step, reply)
        return reply

    def Join(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        def handle(site: str, s: Session) -> bytes:
            _, body, tensors = wire.open_message(s, request.sealed, "join", max_bytes=self.frame_limits["join"])
            req = wire.join_request_from_json(body)
            if req.site != site or tensors:
                raise ProtocolError(f"site {site!r}: join request names another site or carries tensors")
            reply = self.coordinator.join(req)
            return wire.seal_message(s, "join-reply", wire.join_reply_to_json(reply), [])

        return self._sealed(request, context, handle)

    def _step(self, site: str, header: Any, body: Any) -> Any:
        step = wire.step_from_json(body)
        if step.site != site or step.round != header.round or step.step != header.step:
            raise ProtocolError(f"site {site!r}: step header does not match the sealed frame")
        return step

    def _forward(self, site: str, s: Session, sealed: bytes) -> bytes:
        header, body, tensors = wire.open_message(s, sealed, "forward", max_bytes=self.frame_limits["forward"])
        step = self._step(site, header, body)
        if len(tensors) != 1:
            raise ProtocolError(f"site {site!r}: forward carries {len(tensors)} tensors, expected 1")
        self._book_request(site, sealed, "forward", step.round, step.step, step.mode)
        feats = self.coordinator.forward(step, tensors[0])
        reply = wire.seal_message(s, "features", None, list(feats), round=step.round, step=step.step,
                                  wire_dtype=self.wire_dtype)
        return self._book_reply(site, "forward", reply, "features", step.round, step.step, step.mode)

    def _backward(self, site: str, s: Session, sealed: bytes) -> bytes:
        header, body, tensors = wire.open_message(s, sealed, "backward", max_bytes=self.frame_limits["backward"])
        step = self._step(site, header, body)
        self._book_request(site, sealed, "backward", step.round, step.step, step.mode)
        dz = self.coordinator.backward(step, tensors)
        reply = wire.seal_message(s, "input-grad", None, [dz], round=step.round, step=step.step,
                                  wire_dtype=self.wire_dtype)
        return self._book_reply(site, "backward", reply, "input-grad", step.round, step.step, step.mode)

    def Forward(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        return self._sealed(request, context, lambda site, s: self._forward(site, s, request.sealed))

    def Backward(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        return self._sealed(request, context, lambda site, s: self._backward(site, s, request.sealed))

    def _admit_stream(self, context: grpc.ServicerContext, chunks: Iterator[pb.Chunk]) -> tuple[str, pb.Chunk | None]:
        """Who streams, checked before any chunk is read: (site, the first chunk if it had to be read).

        Protects against a peer without a valid certificate or a session making the server buffer a frame
        (up to ``max_frame_bytes``, on each of the worker threads) only to refuse it afterwards: the
        certificate (revoked, unregistered, wrong CA...) and the session are checked from the call's TLS
        context, before the first chunk is taken from the stream, so the refusal costs constant memory.
        In insecure_dev mode (no certificate) the first chunk names the site; it is one gRPC message.
        """
        site = self._certified(context)
        first = None
        if site is None:
            first = next(chunks, None)
            site = self._claim(None, first.site if first is not None else "")
        self._session(site)
        self._enter(site)
        return site, first

    def _stream(self, chunks: Iterator[pb.Chunk], context: grpc.ServicerContext,
                handle: Callable[[str, Session, bytes], bytes]) -> Iterator[pb.Chunk]:
        """A frame streamed in chunks: admit the peer, join (bounded before buffering), handle, stream back."""
        chunks = iter(chunks)
        site, first = self._run(context, lambda: self._admit_stream(context, chunks))
        try:
            def pieces() -> Iterator[bytes]:
                if first is not None:
                    yield first.data
                for chunk in chunks:
                    if chunk.site != site:
                        if not self.insecure_dev:
                            self._claim(site, chunk.site)  # refused: a site cannot speak for another
                        raise InvalidMessage("chunking", "chunks of one frame name different sites")
                    yield chunk.data

            def run() -> bytes:
                session = self._session(site)
                blob = join_chunks(pieces(), max_bytes=max(self.frame_limits["forward"], self.frame_limits["backward"]))
                return handle(site, session, blob)

            reply = self._run(context, run)
            for piece in split_chunks(reply, self.max_message_bytes):
                yield pb.Chunk(site=site, data=piece)
        finally:  # also when the client goes away mid-stream (the generator is closed)
            self._exit(site)

    def ForwardStream(self, request_iterator: Iterator[pb.Chunk],  # noqa: N802
                      context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        yield from self._stream(request_iterator, context, self._forward)

    def BackwardStream(self, request_iterator: Iterator[pb.Chunk],  # noqa: N802
                       context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        yield from self._stream(request_iterator, context, self._backward)

    def RoundEnd(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        def handle(site: str, s: Session) -> bytes:
            header, body, tensors = wire.open_message(s, request.sealed, "round-end",
                                                      max_bytes=self.frame_limits["round-end"])
            report = wire.round_report_from_wire(body, tensors)
            if report.site != site or report.round != header.round:
                raise ProtocolError(f"site {site!r}: round report does not match the sealed frame")
            self._book_request(site, request.sealed, "round-end", report.round)
            self.coordinator.round_end(report)
            reply = wire.seal_message(s, "ok", None, [], round=report.round)
            return self._book_reply(site, "round-end", reply, "ok", report.round)

        return self._sealed(request, context, handle)

    def RoundSync(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        def handle(site: str, s: Session) -> bytes:
            header, body, tensors = wire.open_message(s, request.sealed, "round-sync",
                                                      max_bytes=self.frame_limits["round-sync"])
            _require_no_payload(site, "round-sync", body, tensors)
            self._book_request(site, request.sealed, "round-sync", header.round)
            result = self.coordinator.round_sync(site, header.round)
            meta, out = wire.round_sync_to_wire(result)
            reply = wire.seal_message(s, "round-sync-reply", meta, out, round=header.round)
            return self._book_reply(site, "round-sync", reply, "round-sync-reply", header.round)

        return self._sealed(request, context, handle)

    def Leave(self, request: pb.Sealed, context: grpc.ServicerContext) -> pb.Sealed:  # noqa: N802
        def handle(site: str, s: Session) -> bytes:
            _, body, tensors = wire.open_message(s, request.sealed, "leave", max_bytes=self.frame_limits["leave"])
            _require_no_payload(site, "leave", None, tensors)
            self.coordinator.leave(site, wire.leave_privacy_from_wire(site, body))
            answer = wire.seal_message(s, "ok", None, [])
            with self._lock:
                if self._sessions.get(site) is s:
                    del self._sessions[site]
            return answer

        return self._sealed(request, context, handle)


def serve(coordinator: Coordinator, *, address: str, server_key_pem: bytes, server_cert_pem: bytes, ca_pem: bytes,
          registry_dir: str | Path, identity_key: Ed25519PrivateKey, site_keys: Mapping[str, Ed25519PublicKey],
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, insecure_dev: bool = False,
          max_workers: int = 32, ledger: LedgerBook | None = None,
          peer_fingerprints: dict[str, str] | None = None, wire_dtype: torch.dtype | None = None,
          max_frame_bytes: int | None = None, max_calls_per_site: int = DEFAULT_MAX_CALLS_PER_SITE) -> grpc.Server:
    """Start serving ``coordinator`` on ``address`` (``host:port``; port 0 picks a free one, see :func:`bound_port`).

    The CA, CRL and registry are read once here: restart the server after a revocation.
    """
    host, _ = split_address(address)
    if insecure_dev and host not in LOOPBACK_HOSTS:
        raise ConfigError(f"insecure_dev serves without TLS and only on loopback; refusing address {address!r}")
    if not 0 < max_message_bytes <= min(DEFAULT_MAX_BLOB_BYTES, 2**31 - 1 - GRPC_OVERHEAD):
        raise ConfigError("max_message_bytes must be positive and below 2 GiB")
    service = FederationService(coordinator, ca_pem=ca_pem, registry_dir=registry_dir, identity_key=identity_key,
                                site_keys=site_keys, max_message_bytes=max_message_bytes, insecure_dev=insecure_dev,
                                ledger=ledger, peer_fingerprints=peer_fingerprints, wire_dtype=wire_dtype,
                                max_frame_bytes=max_frame_bytes, max_calls_per_site=max_calls_per_site)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedbone-grpc"),
                         options=grpc_options(max_message_bytes))
    pb_grpc.add_FederationServicer_to_server(service, server)
    if insecure_dev:
        port = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(server_key_pem, server_cert_pem)], root_certificates=ca_pem,
                                            require_client_auth=True)
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise ConfigError(f"cannot bind the server to {address!r}")
    server.start()
    _PORTS[id(server)] = port
    return server


_PORTS: dict[int, int] = {}


def bound_port(server: grpc.Server) -> int:
    """The TCP port ``serve`` bound (useful with port 0)."""
    return _PORTS[id(server)]


def _require_no_payload(site: str, what: str, body: object, tensors: list) -> None:
    if body is not None or tensors:
        raise ProtocolError(f"site {site!r}: {what} request carries a payload")

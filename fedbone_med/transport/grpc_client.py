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

TLS failures are not transient. gRPC reports a failed TLS handshake as UNAVAILABLE ("Socket closed"),
like a server that is down, so when a connect fails that way :func:`probe_tls` makes a real TLS handshake
to the same address with the same CA, certificate, key and server name (Python's ``ssl``) to learn why.
If the server answers at TCP level but a certificate check fails (the server's certificate expired, is
for another name or from another CA; or the server refused this site's certificate), :meth:`connect`
raises :class:`TlsError` (exit code 11) naming the check and what to do, instead of the retryable
UNAVAILABLE. :func:`check_kit_certificate` checks a site's own certificate before it connects.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import Tensor

from ..audit.ledger import FrameLedger
from ..crypto.chunks import join_chunks, split_chunks
from ..crypto.envelope import Session
from ..crypto.handshake import ClientHandshake
from ..errors import ConfigError, ProtocolError
from ..models.split import CutSpec
from . import wire
from .base import Transport
from .limits import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    FRAME_SLACK,
    grpc_options,
    split_address,
)
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader
from .proto import fedbone_pb2 as pb
from .proto import fedbone_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 660.0  # above the coordinator's default 600 s wait for the other sites


class RemoteError(ProtocolError):
    """A gRPC call failed; ``code`` is the status code name (e.g. ``"PERMISSION_DENIED"``)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method, self.code, self.details = method, code, details


# -- TLS diagnosis -------------------------------------------------------------------------------
TLS_PROBE_TIMEOUT = 5.0  # seconds for the probe's TCP connect, TLS handshake, and the server's first bytes
KIT_EXPIRY_WARNING_DAYS = 14
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


class TlsError(RemoteError):
    """A TLS certificate check failed; retrying cannot fix it, so a site stops at once (exit code 11).

    ``check`` names the failed check: the site's own kit (``kit-expired``, ``kit-not-yet-valid``,
    ``kit-chain``, ``kit-ca-expired``, ``kit-key``, ``kit-unreadable``), the server's certificate as this
    site sees it (``server-expired``, ``server-not-yet-valid``, ``server-name``, ``server-ca``,
    ``server-certificate``), the server refusing this site's certificate (a gRPC server closes the
    connection without an alert: the ``kit-*`` check that explains it, ``client-usage``, or
    ``client-refused``; a server that sends an alert: ``client-expired``, ``client-unknown-ca``), or
    another TLS failure (``tls-handshake``, ``not-tls``: the server speaks plain TCP). It is a
    :class:`RemoteError` with code ``UNAUTHENTICATED`` (not a retry code), so code that handles failed
    calls treats it as fatal.
    """

    exit_code = 11

    def __init__(self, check: str, message: str) -> None:
        ProtocolError.__init__(self, message)
        self.method, self.code, self.details = "TLS", "UNAUTHENTICATED", message
        self.check = check


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _load_cert(pem: bytes, check: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TlsError(check, f"{what} is not a PEM certificate; ask the federation operator for a new kit") from None


def check_kit_certificate(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, now: datetime | None = None,
                          warn_days: int = KIT_EXPIRY_WARNING_DAYS) -> str | None:
    """Check a site's own TLS credentials before it connects; raise :class:`TlsError` naming the failed check.

    The kit certificate must be within its validity window, be signed by the kit's CA (itself not
    expired), and match the kit's TLS key. Returns a one-line warning if the certificate expires within
    ``warn_days`` days, else ``None``.
    """
    now = now or datetime.now(timezone.utc)
    ca = _load_cert(ca_pem, "kit-unreadable", "the kit's CA certificate (ca.pem)")
    cert = _load_cert(cert_pem, "kit-unreadable", "this site's kit certificate (site.pem)")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    window = f"valid from {_day(start)} to {_day(end)}"
    if now < start:
        raise TlsError("kit-not-yet-valid", f"this site's kit certificate (site.pem) is not valid yet ({window}; "
                                            f"now is {_day(now)}): check this machine's clock")
    if now >= end:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        site = str(cn[0].value) if cn else "SITE"
        raise TlsError("kit-expired", f"this site's kit certificate (site.pem) expired on {_day(end)} ({window}): "
                                      "ask the federation operator for a new kit "
                                      f"(`fedbone-server provision --renew {site}`)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError("kit-chain", "this site's kit certificate (site.pem) is not signed by the kit's CA (ca.pem): "
                                    "the kit mixes files of different federations; ask the federation operator "
                                    "for a new kit") from None
    if now >= ca.not_valid_after_utc:
        raise TlsError("kit-ca-expired", f"the federation's CA certificate (ca.pem) expired on "
                                         f"{_day(ca.not_valid_after_utc)}: the federation operator must provision "
                                         "a new federation and hand out new kits")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError("kit-key", "this site's TLS key (site-key.pem) is not an unencrypted PEM private key; "
                                  "ask the federation operator for a new kit") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TlsError("kit-key", "this site's TLS key (site-key.pem) does not belong to its certificate (site.pem): "
                                  "the kit's files were mixed up; ask the federation operator for a new kit")
    if end - now < timedelta(days=warn_days):
        days = (end - now).days
        return (f"warning: this site's kit certificate (site.pem) expires on {_day(end)} (in {days} day"
                f"{'' if days == 1 else 's'}): ask the federation operator for a new kit before then")
    return None


@contextmanager
def _pem_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """The certificate and key as files for ``ssl`` (which loads them only from paths): in a private
    temporary directory (mode 0700, key 0600), removed on exit."""
    with tempfile.TemporaryDirectory(prefix="fedbone-tls-") as d:
        paths = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in zip(paths, (cert_pem, key_pem), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield paths


def _client_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, verify: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with _pem_files(cert_pem, key_pem) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _server_certificate(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> x509.Certificate | None:
    """The certificate the server presents, read without verifying it (to describe a failed check)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _names(cert: x509.Certificate | None) -> list[str]:
    if cert is None:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
        [str(n) for n in san.get_values_for_type(x509.IPAddress)]


def _server_check_failed(exc: ssl.SSLCertVerificationError, address: str, server_name: str,
                         cert: x509.Certificate | None) -> TlsError:
    """This site refused the server's certificate: say which check failed and what to do."""
    code = exc.verify_code
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        when = f" on {_day(cert.not_valid_after_utc)}" if cert is not None else ""
        return TlsError("server-expired", f"the server's certificate at {address} expired{when}: the federation "
                                          "operator must issue a new server certificate (this site's kit is not "
                                          "the problem)")
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        when = f" before {_day(cert.not_valid_before_utc)}" if cert is not None else " yet"
        return TlsError("server-not-yet-valid", f"the server's certificate at {address} is not valid{when}: check "
                                                "the clocks of this machine and the server")
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        names = _names(cert)
        if names:
            listed = ", ".join(repr(n) for n in names)
            return TlsError("server-name", f"the server's certificate at {address} is not valid for the name "
                                           f"{server_name!r} (it is for {listed}); pass --server-name {names[0]} or "
                                           f"re-provision the server certificate with --server-name {server_name}")
        return TlsError("server-name", f"the server's certificate at {address} is not valid for the name "
                                       f"{server_name!r}; pass the name in the server's certificate with "
                                       f"--server-name, or re-provision it with --server-name {server_name}")
    if code in (2, 7, 18, 19, 20, 21):  # issuer unknown, bad signature, self-signed: another CA
        issuer = f" (it is issued by '{cert.issuer.rfc4514_string()}')" if cert is not None else ""
        return TlsError("server-ca", f"the server's certificate at {address} is not signed by your kit's CA{issuer}: "
                                     "this kit belongs to another federation, or the address is another "
                                     "federation's server; check --server (default: the kit's server-address.txt) "
                                     "and ask the federation operator")
    return TlsError("server-certificate", f"the server's certificate at {address} failed verification "
                                          f"({exc.verify_message}); ask the federation operator")


_CLIENT_ALERTS = {  # the server's TLS alert about this site's certificate -> (check, what to do)
    "CERTIFICATE_EXPIRED": ("client-expired", "the server refused this site's certificate as expired (TLS alert "
                                              "'certificate expired'): ask the federation operator for a new kit "
                                              "(or check the clocks of this machine and the server)"),
    "UNKNOWN_CA": ("client-unknown-ca", "the server refused this site's certificate: it is not signed by the "
                                        "server's CA (TLS alert 'unknown ca'); this kit belongs to another "
                                        "federation: ask this server's operator for a kit"),
    "CERTIFICATE_REVOKED": ("client-refused", "the server refused this site's certificate as revoked (TLS alert "
                                              "'certificate revoked'): ask the federation operator for a new kit"),
    "CERTIFICATE_REQUIRED": ("client-refused", "the server asked for a client certificate and did not get one "
                                               "(TLS alert 'certificate required'): check the kit's site.pem"),
}


def _alert(exc: ssl.SSLError, address: str) -> TlsError | None:
    """A failed TLS exchange after the server answered at TCP level; ``None`` if it may be transient."""
    reason = exc.reason or ""
    if "ALERT_" in reason:
        alert = reason.split("ALERT_", 1)[1]
        if alert in _CLIENT_ALERTS:
            check, what = _CLIENT_ALERTS[alert]
            return TlsError(check, f"TLS to {address}: {what}")
        text = alert.lower().replace("_", " ")
        if "CERTIFICATE" in alert or alert in ("ACCESS_DENIED", "DECRYPT_ERROR"):
            return TlsError("client-refused", f"TLS to {address}: the server refused this site's certificate "
                                              f"(TLS alert '{text}'): ask the federation operator to check this "
                                              "site's kit, or for a new one")
        return TlsError("tls-handshake", f"TLS to {address}: the server ended the handshake (TLS alert '{text}'); "
                                         "ask the federation operator")
    if reason in ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
        return TlsError("not-tls", f"the server at {address} does not speak TLS ({reason.lower()}): is it running "
                                   "with --insecure-dev, or is the address another service?")
    return None


def probe_tls(address: str, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, server_name: str,
              timeout: float = TLS_PROBE_TIMEOUT) -> TlsError | None:
    """Why TLS with the server at ``address`` fails, if it does for a reason retrying cannot fix.

    Makes one TLS handshake as the site's gRPC channel would (the kit's CA, certificate and key, the
    expected ``server_name``, ALPN h2), then sends the HTTP/2 preface and waits for the server's first
    bytes (with TLS 1.3 the server judges the client's certificate after the client's side of the
    handshake is complete). Returns the :class:`TlsError` for a failed certificate check, or ``None``
    when TCP itself fails (server down: retry) or TLS succeeds (the failure lies elsewhere).
    """
    try:
        host, port_text = split_address(address)
        port = int(port_text)
        ctx = _client_context(ca_pem, cert_pem, key_pem, verify=True)
    except (ConfigError, ValueError, OSError):  # ssl.SSLError is an OSError; the kit check reports bad kits
        return None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # refused, unreachable, no route: the server is not (yet) there
    with sock:
        try:
            tls = ctx.wrap_socket(sock, server_hostname=server_name)
        except ssl.SSLCertVerificationError as exc:
            return _server_check_failed(exc, address, server_name,
                                        _server_certificate(host, port, _client_context(
                                            ca_pem, cert_pem, key_pem, verify=False), timeout))
        except ssl.SSLError as exc:
            return _alert(exc, address)
        except OSError:
            return None
        with tls:
            try:
                tls.sendall(_H2_PREFACE)
                data = tls.recv(1)
            except ssl.SSLError as exc:
                return _alert(exc, address) or _client_refused(address, ca_pem, cert_pem, key_pem)
            except ConnectionResetError:
                data = b""
            except OSError:  # a timeout: the server is slow, not refusing
                return None
    return None if data else _client_refused(address, ca_pem, cert_pem, key_pem)


def _client_refused(address: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> TlsError:
    """The server closed the connection right after the TLS handshake, without a word or an alert.

    That is how a gRPC server refuses a client certificate (it sends no alert). The reason is looked
    for on this side: this site's certificate checked as :func:`check_kit_certificate` does, and its usage.
    """
    head = (f"the server at {address} closed the connection right after the TLS handshake: it refused this "
            "site's certificate")
    try:
        check_kit_certificate(ca_pem, cert_pem, key_pem, warn_days=0)
    except TlsError as exc:
        return TlsError(exc.check, f"{head}: {exc}")
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and x509.ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return TlsError("client-usage", f"{head}: it is not a client certificate (no clientAuth usage); use the "
                                        "site.pem of this site's kit, or ask the federation operator for a new kit")
    return TlsError("client-refused", f"{head}. By this machine's clock it is valid and signed by the kit's CA, "
                                      "so the server trusts another CA for sites, or its clock differs: ask the "
                                      "federation operator to check this site's kit against the server")


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
        except RemoteError as exc:
            self.close()
            tls = self._tls_failure(exc)
            if tls is not None:
                raise tls from None
            raise
        except BaseException:
            self.close()
            raise

    def _tls_failure(self, exc: RemoteError) -> TlsError | None:
        """Why a connect failed, if TLS refused it for a reason retrying cannot fix (see :func:`probe_tls`)."""
        if self.insecure_dev or exc.code not in ("UNAVAILABLE", "UNKNOWN"):
            return None
        if not (self._ca and self._cert and self._key):
            return None
        return probe_tls(self.address, ca_pem=self._ca, cert_pem=self._cert, key_pem=self._key,
                         server_name=self.server_name)

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
        # The first call returns the run id and a fresh challenge, which the signed hello must answer.
        offer = self._call("Handshake", pb.HandshakeRequest(site=self.site))
        if self.run_id is None:
            self.run_id = offer.run_id
        hs = ClientHandshake(self._identity, self._server_key, self.run_id, self.site, challenge=offer.server_hello,
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

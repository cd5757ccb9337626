"""Site identities at run time: who is on the other end of a mutual-TLS connection.

``fedbone-server provision`` (:mod:`fedbone_med.crypto.provision`) writes a project CA, a
certificate revocation list (``crl.pem``) and a site registry (``registry.json``: site name ->
SHA-256 fingerprint, serial and expiry of the one certificate that site was issued). The server
loads these with :func:`load_ca`, :func:`load_crl` and :func:`load_registry`, and calls
:func:`verify_peer` on every peer certificate. A certificate is accepted only if *all* of these hold:

- it is signed by the project CA (and the CA is a CA and within its own validity window), and the
  path passes pyca's RFC 5280 client verifier as well;
- the clock (injected, UTC) is inside its validity window;
- it is an end-entity certificate whose ExtendedKeyUsage includes clientAuth;
- its serial is not on the CRL, and the CRL itself is signed by the same CA;
- its CN names a site, its URI SAN is ``fedbone://site/<CN>``, and the registry holds an unrevoked
  entry for that site whose fingerprint and serial are exactly this certificate's (and the registry
  names this CA's fingerprint).

The CRL's ``next_update`` is not enforced: the operator's CRL is a local file, re-signed on each
revocation, not fetched from a distribution point.

The last check means that even a certificate correctly signed by the CA is refused if it is not the
one recorded for that site (for instance a re-issue the operator never registered). Failures raise
:class:`IdentityError` (a :class:`~.errors.SecurityError`) with a reason code; :func:`verify_peer`
never returns a falsy value.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .errors import SecurityError

REGISTRY_FORMAT = "fedbone-registry/1"
SITE_URI_PREFIX = "fedbone://site/"
REGISTRY_FILE = "registry.json"
CRL_FILE = "crl.pem"
CA_CERT_FILE = "ca/ca.pem"


class IdentityError(SecurityError):
    """A peer's certificate, or the registry, CA or CRL used to check it, is not acceptable.

    ``reason`` is one of: ``parse``, ``clock``, ``ca``, ``crl``, ``registry``, ``chain``,
    ``not-yet-valid``, ``expired``, ``not-end-entity``, ``eku``, ``revoked``, ``name``,
    ``unregistered``, ``fingerprint``. The message adds a human-readable detail.
    """

    exit_code = 9

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason


@dataclass(frozen=True)
class RegistryEntry:
    """What the server knows about one site's certificate."""

    name: str
    fingerprint: str  # lowercase hex SHA-256 of the DER certificate
    serial: int
    not_after: datetime
    revoked: bool = False
    revoked_at: str | None = None
    reason: str | None = None
    identity_key: str | None = None  # hex of the site's raw Ed25519 handshake public key (32 bytes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "serial": format(self.serial, "x"),
            "not_after": self.not_after.isoformat(),
            "revoked": self.revoked,
        }
        if self.identity_key is not None:
            out["identity_key"] = self.identity_key
        if self.revoked:
            out["revoked_at"] = self.revoked_at
            out["reason"] = self.reason
        return out


@dataclass
class Registry:
    """The server's site registry (``registry.json``)."""

    project: str
    server_address: str
    ca_fingerprint: str
    sites: dict[str, RegistryEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "project": self.project,
            "server_address": self.server_address,
            "ca_fingerprint": self.ca_fingerprint,
            "sites": {name: self.sites[name].to_json() for name in sorted(self.sites)},
        }


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise IdentityError("clock", "clock: a timezone-aware (UTC) datetime is required")
    return dt.astimezone(timezone.utc)


def load_certificate(data: bytes | str | x509.Certificate) -> x509.Certificate:
    """A certificate from PEM (bytes or str) or DER bytes; an :class:`IdentityError` if it is neither."""
    if isinstance(data, x509.Certificate):
        return data
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError:
        raise IdentityError("parse", "certificate: not a parseable X.509 certificate (PEM or DER)") from None


def fingerprint(cert: bytes | str | x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding (64 characters, no separators)."""
    return load_certificate(cert).fingerprint(hashes.SHA256()).hex()


def load_ca(directory: str | Path) -> x509.Certificate:
    """The project CA certificate of a provisioning directory (``ca/ca.pem``), or a path to a PEM file."""
    p = Path(directory)
    path = p if p.is_file() else p / CA_CERT_FILE
    try:
        return load_certificate(path.read_bytes())
    except OSError as exc:
        raise IdentityError("ca", f"CA certificate {path}: cannot be read ({exc.strerror})") from None


def load_crl(directory: str | Path) -> x509.CertificateRevocationList:
    """The certificate revocation list of a provisioning directory (``crl.pem``), or a path to it."""
    p = Path(directory)
    path = p if p.is_file() else p / CRL_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IdentityError("crl", f"CRL {path}: cannot be read ({exc.strerror})") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(raw)
        return x509.load_der_x509_crl(raw)
    except ValueError:
        raise IdentityError("crl", f"CRL {path}: not a parseable certificate revocation list") from None


def _entry_from_json(name: str, raw: Any) -> RegistryEntry:
    if not isinstance(raw, Mapping):
        raise IdentityError("registry", f"registry: entry for site {name!r} is not an object")
    missing = sorted({"fingerprint", "serial", "not_after"} - set(raw))
    if missing:
        raise IdentityError("registry", f"registry: entry for site {name!r} lacks {', '.join(missing)}")
    for key in ("fingerprint", "serial", "not_after", "revoked_at", "reason"):
        if key in raw and not isinstance(raw[key], str) and not (key in ("revoked_at", "reason") and raw[key] is None):
            raise IdentityError("registry", f"registry: entry for site {name!r}: {key} must be a string")
    fp, revoked = raw["fingerprint"].lower(), raw.get("revoked", False)
    if not 1 <= len(raw["serial"]) <= 40:  # X.509 serials are at most 20 octets
        raise IdentityError("registry", f"registry: entry for site {name!r} has a malformed serial")
    try:
        serial = int(raw["serial"], 16)
        not_after = datetime.fromisoformat(raw["not_after"])
    except ValueError:
        raise IdentityError("registry", f"registry: entry for site {name!r} has a malformed serial or "
                                        "not_after") from None
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise IdentityError("registry", f"registry: entry for site {name!r} has a malformed fingerprint")
    if not isinstance(revoked, bool):
        raise IdentityError("registry", f"registry: entry for site {name!r}: revoked must be true or false")
    ident = raw.get("identity_key")
    if ident is not None and (not isinstance(ident, str) or len(ident) != 64
                              or any(c not in "0123456789abcdef" for c in ident)):
        raise IdentityError("registry", f"registry: entry for site {name!r} has a malformed identity_key")
    return RegistryEntry(
        name=name, fingerprint=fp, serial=serial, not_after=not_after, revoked=revoked,
        revoked_at=raw.get("revoked_at"), reason=raw.get("reason"), identity_key=ident,
    )


def registry_from_json(data: Any) -> Registry:
    """Build a :class:`Registry` from the parsed contents of ``registry.json``."""
    if not isinstance(data, Mapping) or data.get("format") != REGISTRY_FORMAT:
        raise IdentityError("registry", f"registry: not a {REGISTRY_FORMAT} document")
    sites = data.get("sites")
    if not isinstance(sites, Mapping):
        raise IdentityError("registry", "registry: 'sites' must be an object")
    for key in ("project", "server_address", "ca_fingerprint"):
        if not isinstance(data.get(key, ""), str):
            raise IdentityError("registry", f"registry: {key} must be a string")
    return Registry(
        project=data.get("project", ""),
        server_address=data.get("server_address", ""),
        ca_fingerprint=data.get("ca_fingerprint", ""),
        sites={str(name): _entry_from_json(str(name), raw) for name, raw in sites.items()},
    )


def load_registry(directory: str | Path) -> Registry:
    """Load ``registry.json`` from a provisioning directory (or the file itself)."""
    p = Path(directory)
    path = p if p.is_file() else p / REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise IdentityError(
            "registry", f"{path}: cannot be read ({exc.strerror}); run `fedbone-server provision`"
        ) from None
    except (ValueError, RecursionError):  # ValueError: not UTF-8 or JSON; RecursionError: nested too deeply
        raise IdentityError("registry", f"registry {path}: not valid JSON") from None
    return registry_from_json(data)


def site_name_of(cert: x509.Certificate) -> str:
    """The site name a certificate claims: its CN, which must equal its ``fedbone://site/`` URI SAN."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str) or not cns[0].value:
        raise IdentityError("name", "certificate: subject must carry exactly one common name (the site name)")
    name = cns[0].value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("name", f"certificate for {name!r} has no SubjectAlternativeName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if f"{SITE_URI_PREFIX}{name}" not in uris:
        raise IdentityError("name", f"certificate for {name!r} has no URI SAN {SITE_URI_PREFIX}{name}")
    return name


def _check_ca(ca_cert: x509.Certificate, now: datetime) -> None:
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise IdentityError("ca", "CA certificate: no BasicConstraints; not a CA") from None
    if not bc.ca:
        raise IdentityError("ca", "CA certificate: BasicConstraints ca=False; not a CA")
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise IdentityError("ca",
            f"CA certificate: outside its validity window ({ca_cert.not_valid_before_utc.isoformat()} .. "
            f"{ca_cert.not_valid_after_utc.isoformat()}); re-provision the federation"
        )


def _check_crl(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> None:
    if crl.issuer != ca_cert.subject:
        raise IdentityError("crl", "CRL: issued by a different authority than the project CA")
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise IdentityError("crl", "CRL: signature does not verify against the project CA")


def verify_peer(
    cert: bytes | str | x509.Certificate,
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList,
    registry: Registry,
    *,
    now: datetime | None = None,
) -> str:
    """Check a peer's certificate (PEM or DER) against the project CA, CRL and registry; return the site name.

    ``now`` is the clock (timezone-aware; default: the current UTC time). Any failure raises
    :class:`IdentityError` naming the check that failed.
    """
    clock = _utc(now) if now is not None else datetime.now(timezone.utc)
    leaf = load_certificate(cert)
    _check_ca(ca_cert, clock)
    # Chain: issued by, and signed with the key of, the project CA.
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError("chain", "not issued by this federation's CA (issuer or signature mismatch)") from None
    # Validity window.
    if clock < leaf.not_valid_before_utc:
        raise IdentityError("not-yet-valid", f"certificate: not valid before {leaf.not_valid_before_utc.isoformat()}")
    if clock > leaf.not_valid_after_utc:
        raise IdentityError("expired",
            f"certificate: expired at {leaf.not_valid_after_utc.isoformat()}; the site needs a renewed startup kit"
        )
    # End entity with clientAuth.
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise IdentityError("not-end-entity", "certificate: is a CA certificate, not a site certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError("eku", "certificate: no ExtendedKeyUsage; a site certificate needs clientAuth") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError("eku", "certificate: ExtendedKeyUsage lacks clientAuth; not a site certificate")
    # Revocation.
    _check_crl(crl, ca_cert)
    if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
        raise IdentityError("revoked", f"certificate: serial {leaf.serial_number:x} has been revoked")
    # The whole path once more under RFC 5280 (pyca's verifier: critical extensions, key usage, path length).
    try:
        PolicyBuilder().store(Store([ca_cert])).time(clock).build_client_verifier().verify(leaf, [])
    except VerificationError as exc:
        raise IdentityError("chain", f"RFC 5280 path validation failed ({exc})") from None
    # Registry: exactly the certificate recorded for this site, from this CA.
    if registry.ca_fingerprint and not hmac.compare_digest(registry.ca_fingerprint, fingerprint(ca_cert)):
        raise IdentityError("registry", "the registry was written for a different CA than the one given")
    name = site_name_of(leaf)
    entry = registry.sites.get(name)
    if entry is None:
        raise IdentityError("unregistered", f"certificate: site {name!r} is not in the registry")
    if entry.revoked:
        raise IdentityError("revoked", f"certificate: site {name!r} is marked revoked in the registry")
    if not hmac.compare_digest(fingerprint(leaf), entry.fingerprint) or leaf.serial_number != entry.serial:
        raise IdentityError("fingerprint",
            f"certificate: fingerprint does not match the registry entry for site {name!r} "
            "(not the certificate this site was issued)"
        )
    return name

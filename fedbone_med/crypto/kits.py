"""Load what ``fedbone-server provision`` wrote: the server's directory and a site's startup kit.

Every problem is reported as a :class:`KitError` (a :class:`~fedbone_med.errors.ConfigError`) naming
the file, what is wrong with it (missing, unreadable, not PEM, encrypted, the wrong key type, too open
permissions on a secret) and the key type expected there, never its contents. The registry, read
through :func:`~.identity.load_registry`, reports its own problems as an
:class:`~.identity.IdentityError`. Keys are checked when the kit is loaded, so a damaged kit stops the
server or site at start with a message, not with a traceback at its first connection.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError
from .identity import IdentityError, load_registry

ED25519_PRIVATE = "an unencrypted PEM (PKCS#8) Ed25519 private key (the envelope identity key)"
ED25519_PUBLIC = "a PEM Ed25519 public key (an envelope identity)"
TLS_PRIVATE = "an unencrypted PEM ECDSA (P-256) private key (the TLS key)"
CERTIFICATE = "a PEM X.509 certificate"
_NEW_KIT = ("; restore the file from what `fedbone-server provision` wrote (a site administrator: ask the "
            "federation operator for a new kit)")


class KitError(ConfigError):
    """A file of the server's provisioning directory or a site's startup kit is missing or malformed."""


def _read(path: Path, what: str, *, secret: bool = False) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KitError(f"{path}: missing ({what}); is this a directory `fedbone-server provision` wrote?") from None
    except OSError as exc:
        raise KitError(f"{path}: cannot be read ({exc.strerror})") from None
    if secret and os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise KitError(f"{path}: a secret key readable by other users (mode {stat.S_IMODE(path.stat().st_mode):o}); "
                       f"run `chmod 600 {path}`")
    return data


def _key_name(key: object) -> str:
    """A key's type in words (e.g. 'RSA', 'EC (secp256r1)'), for messages."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC ({key.curve.name})"
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name.lstrip("_") or "unknown"


def _private_key(path: Path, what: str, expected: str) -> tuple[bytes, object]:
    data = _read(path, what, secret=True)
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: a password was not given but the key is encrypted
        raise KitError(f"{path}: the {what} is encrypted (password-protected); expected {expected}{_NEW_KIT}") from None
    except UnsupportedAlgorithm:
        raise KitError(f"{path}: the {what} is of an unsupported key type; expected {expected}{_NEW_KIT}") from None
    except ValueError:
        raise KitError(f"{path}: the {what} is not a readable PEM private key; expected {expected}{_NEW_KIT}") from None


def _ed25519_private(path: Path) -> Ed25519PrivateKey:
    _, key = _private_key(path, "Ed25519 identity key", ED25519_PRIVATE)
    if not isinstance(key, Ed25519PrivateKey):
        raise KitError(f"{path}: a key of type {_key_name(key)}, not Ed25519; expected {ED25519_PRIVATE}{_NEW_KIT}")
    return key


def _ed25519_public(path: Path) -> Ed25519PublicKey:
    data = _read(path, "Ed25519 identity public key")
    try:
        key = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm:
        raise KitError(f"{path}: a public key of an unsupported type; expected {ED25519_PUBLIC}{_NEW_KIT}") from None
    except ValueError:
        raise KitError(f"{path}: not a readable PEM public key; expected {ED25519_PUBLIC}{_NEW_KIT}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KitError(f"{path}: a public key of type {_key_name(key)}, not Ed25519; "
                       f"expected {ED25519_PUBLIC}{_NEW_KIT}")
    return key


def _tls_key(path: Path) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """The TLS private key (PEM bytes, as gRPC takes them) after checking that it is one."""
    data, key = _private_key(path, "TLS key", TLS_PRIVATE)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError(f"{path}: a key of type {_key_name(key)}, not ECDSA; expected {TLS_PRIVATE}{_NEW_KIT}")
    return data, key


def _certificate(path: Path, what: str) -> tuple[bytes, x509.Certificate]:
    data = _read(path, what)
    try:
        cert = x509.load_pem_x509_certificate(data)
        cert.public_key()  # parsed lazily: a damaged key inside a well-formed certificate fails only here
    except (ValueError, UnsupportedAlgorithm):
        raise KitError(f"{path}: the {what} is not {CERTIFICATE} with a readable public key{_NEW_KIT}") from None
    return data, cert


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> None:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise KitError(f"{key_path}: this TLS key does not belong to the certificate {cert_path} (files of different "
                       f"kits mixed up){_NEW_KIT}")


def _site_identity(name: str, hex_key: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError:
        raise IdentityError("registry", f"registry: site {name!r} has an identity_key that is not an Ed25519 "
                                        "public key (64 hex digits)") from None


@dataclass(frozen=True)
class ServerKit:
    """The server's side of a provisioning directory (``server/``, ``registry.json``, ``crl.pem``)."""

    root: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity_key: Ed25519PrivateKey
    site_keys: dict[str, Ed25519PublicKey]  # registered, unrevoked sites with an identity key
    address: str

    @classmethod
    def load(cls, root: str | Path) -> ServerKit:
        root = Path(root)
        server = root / "server"
        registry = load_registry(root)
        site_keys = {
            name: _site_identity(name, e.identity_key)
            for name, e in registry.sites.items() if e.identity_key is not None and not e.revoked
        }
        ca_pem, _ = _certificate(server / "ca.pem", "CA certificate")
        cert_pem, cert = _certificate(server / "server.pem", "server certificate")
        key_pem, key = _tls_key(server / "server-key.pem")
        _same_key(cert, key, server / "server.pem", server / "server-key.pem")
        return cls(
            root=root,
            ca_pem=ca_pem,
            cert_pem=cert_pem,
            key_pem=key_pem,
            identity_key=_ed25519_private(server / "identity-key.pem"),
            site_keys=site_keys,
            address=registry.server_address,
        )


@dataclass(frozen=True)
class SiteKit:
    """A site's startup kit (``sites/NAME/`` as handed to the site administrator).

    The TLS certificate's validity and its match with the TLS key are checked when the site starts
    (:func:`~fedbone_med.transport.grpc_client.check_kit_certificate`, which also warns of an expiry).
    """

    root: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity_key: Ed25519PrivateKey
    server_identity: Ed25519PublicKey
    address: str

    @classmethod
    def load(cls, root: str | Path) -> SiteKit:
        root = Path(root)
        address = _read(root / "server-address.txt", "server address").decode("utf-8", "replace").strip()
        ca_pem, _ = _certificate(root / "ca.pem", "CA certificate")
        cert_pem, _ = _certificate(root / "site.pem", "site certificate")
        key_pem, _ = _tls_key(root / "site-key.pem")
        return cls(
            root=root,
            ca_pem=ca_pem,
            cert_pem=cert_pem,
            key_pem=key_pem,
            identity_key=_ed25519_private(root / "identity-key.pem"),
            server_identity=_ed25519_public(root / "server-identity.pub.pem"),
            address=address,
        )

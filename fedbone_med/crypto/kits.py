"""Load what ``fedbone-server provision`` wrote: the server's directory and a site's startup kit.

Every problem is reported as a :class:`~fedbone_med.errors.ConfigError` naming the file and what is
wrong with it (missing, unreadable, wrong key type, too open permissions on a secret), never its
contents.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ConfigError
from .identity import load_registry


def _read(path: Path, what: str, *, secret: bool = False) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing ({what}); is this a directory `fedbone-server provision` wrote?") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    if secret and os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{path}: a secret key readable by other users (mode {stat.S_IMODE(path.stat().st_mode):o}); "
                          f"run `chmod 600 {path}`")
    return data


def _ed25519_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "Ed25519 identity key", secret=True), password=None)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key


def _ed25519_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "Ed25519 identity public key"))
    except ValueError:
        raise ConfigError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


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
            name: Ed25519PublicKey.from_public_bytes(bytes.fromhex(e.identity_key))
            for name, e in registry.sites.items() if e.identity_key is not None and not e.revoked
        }
        return cls(
            root=root,
            ca_pem=_read(server / "ca.pem", "CA certificate"),
            cert_pem=_read(server / "server.pem", "server certificate"),
            key_pem=_read(server / "server-key.pem", "server TLS key", secret=True),
            identity_key=_ed25519_private(server / "identity-key.pem"),
            site_keys=site_keys,
            address=registry.server_address,
        )


@dataclass(frozen=True)
class SiteKit:
    """A site's startup kit (``sites/NAME/`` as handed to the site administrator)."""

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
        return cls(
            root=root,
            ca_pem=_read(root / "ca.pem", "CA certificate"),
            cert_pem=_read(root / "site.pem", "site certificate"),
            key_pem=_read(root / "site-key.pem", "site TLS key", secret=True),
            identity_key=_ed25519_private(root / "identity-key.pem"),
            server_identity=_ed25519_public(root / "server-identity.pub.pem"),
            address=address,
        )

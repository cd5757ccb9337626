"""Ed25519 signing keys for audit-log checkpoints.

Protects the signing key from casual exposure and the log from unknown signers: the private
key is written PEM/PKCS8 with mode 0600 (created with ``O_EXCL``, so an existing key is
never overwritten), and a private key file that the group or others can read is refused
when loaded. Auditors receive only the public key PEM. ``key_id`` is the first 16 hex
characters of SHA-256 over the raw 32-byte public key; checkpoints name the key that
signed them, so keys can be rotated.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .canonical import sha256_hex
from .errors import AuditError

PRIVATE_NAME = "audit-signing-key.pem"
PUBLIC_NAME = "audit-public-key.pem"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    """Deterministic key from a 32-byte seed: for *sample logs and tests only*, never production."""
    if len(seed) != 32:
        raise AuditError("an Ed25519 seed must be exactly 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write ``key`` as PEM PKCS8 with mode 0600; refuse to overwrite an existing file."""
    p = Path(path)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AuditError(f"refusing to overwrite existing key file {p}; move it away first") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_public_key(public_key: Ed25519PublicKey, path: str | Path) -> None:
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise AuditError(f"refusing to overwrite existing public key file {p}; move it away first") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(public_pem(public_key))


def keygen(out_dir: str | Path) -> tuple[Path, Path, str]:
    """Create a new server signing key in ``out_dir``; return (private path, public path, key_id)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / PRIVATE_NAME, d / PUBLIC_NAME
    for p in (priv, pub):
        if p.exists():
            raise AuditError(f"refusing to overwrite existing key file {p}; move it away first")
    key = generate_key()
    save_private_key(key, priv)
    save_public_key(key.public_key(), pub)
    return priv, pub, key_id(key.public_key())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a private key, refusing files readable by group or others."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise AuditError(f"no signing key at {p}; create one with `fedbone-audit keygen --out DIR`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditError(f"signing key {p} is accessible by group/others (mode {stat.S_IMODE(mode):o}); "
                         f"run `chmod 600 {p}` and check who may have copied it")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuditError(f"{p} is not an unencrypted PEM PKCS8 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{p} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except FileNotFoundError:
        raise AuditError(f"no public key at {p}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise AuditError(f"{p} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{p} is not an Ed25519 public key")
    return key


def load_public_keys(paths: list[str | Path]) -> dict[str, Ed25519PublicKey]:
    """Map key_id -> public key for every PEM given (several keys when keys were rotated)."""
    keys = {}
    for path in paths:
        k = load_public_key(path)
        keys[key_id(k)] = k
    return keys

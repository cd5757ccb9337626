"""Private primitives layer (the ``hazmat`` under the recipes). Nothing outside ``crypto/`` imports it.

Thin wrappers over ``cryptography.hazmat``: X25519 key agreement, Ed25519 signatures, HKDF-SHA256,
AES-256-GCM and SHA-256. They do no policy: failures surface as the library's own exceptions
(``InvalidSignature``, ``InvalidTag``, ``ValueError``) and the recipe layers (:mod:`.handshake`,
:mod:`.envelope`) turn them into :class:`~.errors.SecurityError`. Misuse here (a reused nonce, an
unauthenticated public key) breaks every guarantee, which is why only the recipes call it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

X25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
AES_KEY_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16


def sha256(data: bytes) -> bytes:
    """SHA-256 digest of ``data``."""
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def x25519_generate() -> X25519PrivateKey:
    """A fresh ephemeral X25519 private key (from the OS CSPRNG)."""
    return X25519PrivateKey.generate()


def x25519_private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Load a raw 32-byte X25519 private key (test vectors only)."""
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_exchange(key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret. Raises ``ValueError`` on a malformed or low-order peer key."""
    if len(peer_public) != X25519_KEY_BYTES:
        raise ValueError("X25519 public key must be 32 bytes")
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    if shared == bytes(X25519_KEY_BYTES):  # defensive: the library already refuses this
        raise ValueError("X25519 shared secret is all zero")
    return shared


def ed25519_public_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte encoding of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """A 64-byte Ed25519 signature over ``data``."""
    return key.sign(data)


def ed25519_verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Verify; raises ``cryptography.exceptions.InvalidSignature`` on failure, never returns a bool."""
    key.verify(signature, data)


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-and-expand."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ciphertext followed by the 16-byte tag. The caller guarantees nonce uniqueness."""
    if len(key) != AES_KEY_BYTES or len(nonce) != GCM_NONCE_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key and a 12-byte nonce")
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes | memoryview) -> bytes:
    """AES-256-GCM open; raises ``cryptography.exceptions.InvalidTag`` on any tampering."""
    if len(key) != AES_KEY_BYTES or len(nonce) != GCM_NONCE_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key and a 12-byte nonce")
    return AESGCM(key).decrypt(nonce, ciphertext, aad)

"""Per-session handshake: Ed25519-signed ephemeral X25519, keys from HKDF-SHA256 over the transcript.

Three messages: the server's challenge (fresh random bytes, asked for before each handshake), then
client (site) hello -> server hello::

    hello = protocol version | role | ephemeral X25519 public key | peer's ephemeral key (server only)
            | SHA-256 of the client hello (server only) | 32-byte fresh nonce | server challenge
            | run id | site | Ed25519 signature

Each side signs its hello (domain-separated) with its long-term Ed25519 identity key and checks
the other's signature against the public key it trusts (``peer_public_key``; certificates arrive
with provisioning). Keys: ``HKDF-SHA256(X25519 secret, salt=SHA-256(client hello || server hello),
info=direction label)`` gives one 32-byte AES-GCM key per direction, held by a fresh
:class:`~.envelope.Session`.

Protects against: an impostor without the identity key (signature check); a tampering proxy (any
changed byte breaks a signature); a replayed client hello, in the same server launch or after a
restart (``serve --resume`` keeps the run id): the signed client hello carries a challenge that the
server issued (:class:`ChallengeBook`), and each challenge is accepted once, for the site it was issued
to, within ``CHALLENGE_TTL_S`` seconds, and never by another launch of the server (challenges live in
the server process's memory only); a replayed server hello (it is bound to this client hello's hash
and ephemeral key); a hello for another run or site. A refused hello changes no state: the caller
keeps the session it had. Forward secrecy: ephemeral keys are discarded after use. Not protected:
a stolen identity key (impersonation until the key is revoked), a compromised endpoint, and
traffic analysis. All failures raise :class:`~.errors.HandshakeError`.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import _primitives as prim
from .envelope import DEFAULT_MAX_PAYLOAD_BYTES, Session
from .errors import HandshakeError
from .frame import MAX_NAME_BYTES

PROTOCOL_VERSION = 2  # 2: the client hello carries the server's challenge
ROLE_CLIENT, ROLE_SERVER = 1, 2
NONCE_BYTES = 32
CHALLENGE_BYTES = 32
CHALLENGE_TTL_S = 120.0  # a challenge must be answered within this many seconds (server's monotonic clock)
CHALLENGES_PER_SITE = 4  # outstanding challenges kept per site (oldest dropped first)
MAX_HELLO_BYTES = 1024
_SIGN_DOMAIN = b"fedbone-med handshake v2\x00"
_INFO = {"site-to-server": b"fedbone-med v1 key site-to-server", "server-to-site": b"fedbone-med v1 key server-to-site"}
_FIXED = struct.Struct(">BB32s32s32s32s32s")  # version, role, eph, peer eph, client-hello hash, nonce, challenge
_ZERO = bytes(32)


@dataclass(frozen=True)
class _Hello:
    version: int
    role: int
    ephemeral: bytes
    peer_ephemeral: bytes
    client_hello_hash: bytes
    nonce: bytes
    challenge: bytes
    run_id: str
    site: str


def _names(run_id: str, site: str) -> bytes:
    out = b""
    for v in (run_id, site):
        raw = v.encode("utf-8")
        if not raw or len(raw) > MAX_NAME_BYTES:
            raise ValueError(f"run id and site must be 1..{MAX_NAME_BYTES} UTF-8 bytes")
        out += struct.pack(">H", len(raw)) + raw
    return out


def _build(h: _Hello, key: Ed25519PrivateKey) -> bytes:
    body = _FIXED.pack(h.version, h.role, h.ephemeral, h.peer_ephemeral, h.client_hello_hash, h.nonce, h.challenge)
    body += _names(h.run_id, h.site)
    return body + prim.ed25519_sign(key, _SIGN_DOMAIN + body)


def _parse(msg: bytes, peer: Ed25519PublicKey, role: int) -> _Hello:
    """Verify the signature first, then parse; every failure is a HandshakeError."""
    msg = bytes(msg)
    if msg[:1] and msg[0] != PROTOCOL_VERSION:  # before the length: another version has another layout
        raise HandshakeError("version", f"hello speaks handshake protocol version {msg[0]}, this side "
                                        f"speaks {PROTOCOL_VERSION}; run the same fedbone-med version at the site "
                                        "and the server")
    if not _FIXED.size + 4 + prim.ED25519_SIGNATURE_BYTES <= len(msg) <= MAX_HELLO_BYTES:
        raise HandshakeError("malformed", "hello has an impossible length")
    body, sig = msg[:-prim.ED25519_SIGNATURE_BYTES], msg[-prim.ED25519_SIGNATURE_BYTES:]
    try:
        prim.ed25519_verify(peer, sig, _SIGN_DOMAIN + body)
    except InvalidSignature:
        raise HandshakeError("signature", "hello not signed by the trusted peer identity") from None
    version, got_role, eph, peer_eph, ch_hash, nonce, challenge = _FIXED.unpack_from(body)
    pos, names = _FIXED.size, []
    for _ in range(2):
        if pos + 2 > len(body):
            raise HandshakeError("malformed", "truncated hello")
        (n,) = struct.unpack_from(">H", body, pos)
        raw = body[pos + 2:pos + 2 + n]
        if not 1 <= n <= MAX_NAME_BYTES or len(raw) != n:
            raise HandshakeError("malformed", "bad name in hello")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise HandshakeError("malformed", "name is not UTF-8") from None
        pos += 2 + n
    if pos != len(body):
        raise HandshakeError("malformed", "trailing bytes in hello")
    if version != PROTOCOL_VERSION:
        raise HandshakeError("version", "unsupported handshake protocol version")
    if got_role != role:
        raise HandshakeError("role", "hello from the wrong role")
    return _Hello(version, got_role, eph, peer_eph, ch_hash, nonce, challenge, names[0], names[1])


class NonceCache:
    """Bounded set of client-hello nonces seen in this process (oldest evicted first)."""

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, nonce: bytes) -> None:
        """Record ``nonce``; raises :class:`HandshakeError` if it was already seen."""
        with self._lock:
            if nonce in self._seen:
                raise HandshakeError("replay", "client hello was already used")
            self._seen[nonce] = None
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)


_PROCESS_NONCES = NonceCache()


class ChallengeBook:
    """The server's handshake challenges: fresh random bytes per handshake, each accepted at most once.

    Protects against a replayed client hello. The nonce cache above remembers client nonces only in
    this process and only up to its bound, so a hello captured on the wire would be accepted again by a
    restarted server (``serve --resume`` keeps the run id) and would replace the genuine site's session.
    Here the server speaks first: :meth:`issue` hands a site a challenge, the site signs it into its
    hello, and :meth:`redeem` accepts it once, for that site, within ``ttl`` seconds of issuing (the
    server's monotonic clock: no clock agreement with the sites is needed). A book lives in one server
    process only, so no hello signed before a restart can be redeemed after it. Redeeming a challenge
    also retires the site's older ones, so a hello held back on the path cannot displace a newer session.
    Memory is bounded: at most ``per_site`` outstanding challenges per site, oldest dropped first (the
    server issues them only to sites it has authenticated by certificate and that have a registered key).
    """

    def __init__(self, *, ttl: float = CHALLENGE_TTL_S, per_site: int = CHALLENGES_PER_SITE,
                 clock: Callable[[], float] = time.monotonic,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if ttl <= 0 or per_site < 1:
            raise ValueError("ttl and per_site must be positive")
        self.ttl, self.per_site = ttl, per_site
        self._clock, self._random = clock, random_bytes
        self._open: dict[str, OrderedDict[bytes, float]] = {}  # site -> challenge -> issued at, oldest first
        self._lock = threading.Lock()

    def issue(self, site: str) -> bytes:
        """A fresh challenge for ``site``'s next client hello."""
        challenge = self._random(CHALLENGE_BYTES)
        if len(challenge) != CHALLENGE_BYTES:
            raise ValueError("random_bytes returned the wrong length")
        now = self._clock()
        with self._lock:
            book = self._open.setdefault(site, OrderedDict())
            for old in [c for c, at in book.items() if now - at > self.ttl]:
                del book[old]
            book[challenge] = now
            while len(book) > self.per_site:
                book.popitem(last=False)
        return challenge

    def redeem(self, site: str, challenge: bytes) -> None:
        """Accept ``challenge`` for ``site`` once; raises :class:`HandshakeError` (reason ``challenge``)."""
        now = self._clock()
        with self._lock:
            book = self._open.get(site)
            issued = None if book is None else book.get(challenge)
            if book is None or issued is None:
                raise HandshakeError("challenge", "the client hello does not answer a challenge this server "
                                                  "launch issued to this site (replayed, used already, or "
                                                  "from before a restart); handshake again")
            while book:  # this challenge and every older one of this site are spent
                if book.popitem(last=False)[0] == challenge:
                    break
            if not book:
                del self._open[site]
        if now - issued > self.ttl:
            raise HandshakeError("challenge", f"the client hello answers a challenge older than {self.ttl:g} s; "
                                              "handshake again")


def _derive(role: str, shared: bytes, transcript: bytes, run_id: str, site: str, max_payload_bytes: int) -> Session:
    salt = prim.sha256(transcript)
    keys = {d: prim.hkdf_sha256(shared, salt=salt, info=info, length=prim.AES_KEY_BYTES) for d, info in _INFO.items()}
    send, recv = ("site-to-server", "server-to-site") if role == "site" else ("server-to-site", "site-to-server")
    return Session(role=role, run_id=run_id, site=site, send_key=keys[send], recv_key=keys[recv],
                   session_id=salt, max_payload_bytes=max_payload_bytes)


def _exchange(eph: prim.X25519PrivateKey, peer_eph: bytes) -> bytes:
    try:
        return prim.x25519_exchange(eph, peer_eph)
    except ValueError:
        raise HandshakeError("key-agreement", "peer ephemeral key is invalid") from None


class ClientHandshake:
    """The site's side: ``hello()`` -> send; receive the server hello -> ``finish(server_hello)`` -> Session."""

    def __init__(self, identity: Ed25519PrivateKey, peer_public_key: Ed25519PublicKey, run_id: str, site: str, *,
                 challenge: bytes = _ZERO, random_bytes: Callable[[int], bytes] = os.urandom,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        """``challenge``: the server's challenge for this handshake (a server with a :class:`ChallengeBook`
        refuses a hello without the one it issued)."""
        challenge = bytes(challenge)
        if len(challenge) != CHALLENGE_BYTES:
            raise HandshakeError("challenge", "the server sent no valid handshake challenge (an older "
                                              "fedbone-med?); run the same version at the site and the server")
        self._identity, self._peer = identity, peer_public_key
        self.run_id, self.site, self._max = run_id, site, max_payload_bytes
        self._eph: prim.X25519PrivateKey | None = prim.x25519_generate()
        nonce = random_bytes(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("random_bytes returned the wrong length")
        self._eph_pub = prim.x25519_public_bytes(self._eph)
        self._challenge = challenge
        self._hello = _build(_Hello(PROTOCOL_VERSION, ROLE_CLIENT, self._eph_pub, _ZERO, _ZERO, nonce, challenge,
                                    run_id, site), identity)

    def hello(self) -> bytes:
        """The client hello to send to the server."""
        return self._hello

    def finish(self, server_hello: bytes) -> Session:
        """Check the server hello and derive the session keys. Single use."""
        if self._eph is None:
            raise HandshakeError("state", "this handshake was already finished")
        h = _parse(server_hello, self._peer, ROLE_SERVER)
        if (h.peer_ephemeral != self._eph_pub or h.client_hello_hash != prim.sha256(self._hello)
                or h.challenge != self._challenge):
            raise HandshakeError("transcript", "server hello does not answer this client hello")
        if h.run_id != self.run_id or h.site != self.site:
            raise HandshakeError("mismatch", "server hello names another run or site")
        eph, self._eph = self._eph, None
        shared = _exchange(eph, h.ephemeral)
        return _derive("site", shared, self._hello + bytes(server_hello), self.run_id, self.site, self._max)


class ServerHandshake:
    """The server's side for one expected site: ``respond(client_hello)`` -> (server hello, Session)."""

    def __init__(self, identity: Ed25519PrivateKey, peer_public_key: Ed25519PublicKey, run_id: str, site: str, *,
                 challenges: ChallengeBook | None = None, replay_cache: NonceCache | None = None,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        """``challenges``: the book whose challenge the client hello must answer (a networked server always
        passes one; without it only the per-process nonce cache refuses replays, which a restart forgets)."""
        self._identity, self._peer = identity, peer_public_key
        self.run_id, self.site, self._max = run_id, site, max_payload_bytes
        self._challenges = challenges
        self._cache = _PROCESS_NONCES if replay_cache is None else replay_cache
        self._random = random_bytes

    def respond(self, client_hello: bytes) -> tuple[bytes, Session]:
        """Check the client hello (signature, run, site, challenge, fresh nonce); return the server hello and the
        Session. Nothing is changed by a refused hello except that a challenge it answers is spent."""
        client_hello = bytes(client_hello)
        h = _parse(client_hello, self._peer, ROLE_CLIENT)
        if h.peer_ephemeral != _ZERO or h.client_hello_hash != _ZERO:
            raise HandshakeError("malformed", "client hello carries server fields")
        if h.run_id != self.run_id or h.site != self.site:
            raise HandshakeError("mismatch", "client hello names another run or site")
        if self._challenges is not None:
            self._challenges.redeem(self.site, h.challenge)
        self._cache.add(h.nonce)
        eph = prim.x25519_generate()
        shared = _exchange(eph, h.ephemeral)
        nonce = self._random(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("random_bytes returned the wrong length")
        server_hello = _build(_Hello(PROTOCOL_VERSION, ROLE_SERVER, prim.x25519_public_bytes(eph), h.ephemeral,
                                     prim.sha256(client_hello), nonce, h.challenge, self.run_id, self.site),
                              self._identity)
        return server_hello, _derive("server", shared, client_hello + server_hello, self.run_id, self.site, self._max)

"""Cryptography for fedbone-med.

- :mod:`.handshake` — per-session authenticated key agreement (Ed25519-signed X25519, HKDF-SHA256).
- :mod:`.envelope` — :class:`~.envelope.Session` ``seal``/``open`` of every tensor crossing the cut.
- :mod:`.frame` — the authenticated frame header; :mod:`.chunks` — splitting blobs for gRPC limits.
- :mod:`.errors` — :class:`~.errors.SecurityError` and its subclasses.
- :mod:`.identity`, :mod:`.provision` — certificates and the site registry (mutual TLS).

``_primitives`` is private: nothing outside this package imports it.
"""

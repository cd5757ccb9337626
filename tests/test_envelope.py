"""The sealed envelope and the session handshake: round trips, published vectors, and attacks."""

from __future__ import annotations

import struct

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbone_med.crypto import _primitives as prim
from fedbone_med.crypto import envelope
from fedbone_med.crypto.chunks import join_chunks, split_chunks
from fedbone_med.crypto.envelope import Expect, Session
from fedbone_med.crypto.errors import HandshakeError, InvalidMessage, SealError, SecurityError
from fedbone_med.crypto.frame import PREFIX, FrameHeader, TensorSpec, encode_header
from fedbone_med.crypto.handshake import ClientHandshake, NonceCache, ServerHandshake
from fedbone_med.errors import FedboneError

RUN, SITE = "run-1", "site-a"


def pair(run_id: str = RUN, site: str = SITE, **kw) -> tuple[Session, Session]:
    """A fresh handshake; returns (site session, server session)."""
    site_key, server_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    client = ClientHandshake(site_key, server_key.public_key(), run_id, site, **kw)
    server = ServerHandshake(server_key, site_key.public_key(), run_id, site, replay_cache=NonceCache(), **kw)
    hello, server_session = server.respond(client.hello())
    return client.finish(hello), server_session


def hdr(kind: str = "forward", rnd: int = 0, step: int = 0) -> FrameHeader:
    return FrameHeader(run_id=RUN, round=rnd, step=step, site=SITE, kind=kind)  # type: ignore[arg-type]


def reason(exc_info: pytest.ExceptionInfo) -> str:
    return exc_info.value.reason


# -- round trips ---------------------------------------------------------------------------------

def test_errors_are_fedbone_errors_with_exit_code_9():
    assert issubclass(InvalidMessage, SecurityError) and issubclass(HandshakeError, SecurityError)
    assert issubclass(SecurityError, FedboneError) and SecurityError.exit_code == 9


def test_round_trip_both_directions():
    site, server = pair()
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 3, 4, generator=g), torch.randn(5, generator=g).double(), torch.randn(3, 2).half(),
         torch.randn(4, 1).bfloat16(), torch.tensor(1.5), torch.empty(0, 3)]
    h, out = server.open(site.seal(hdr("forward", 1, 2), z), Expect("forward", round=1, step=2, count=len(z)))
    assert (h.direction, h.sequence, h.site, h.run_id) == ("site-to-server", 0, SITE, RUN)
    for a, b in zip(z, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    feats = [torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 16, 2, 2, generator=g)]
    h, out = site.open(server.seal(hdr("features", 1, 2), feats), "features")
    assert h.direction == "server-to-site"
    assert all(torch.equal(a, b) for a, b in zip(feats, out, strict=True))
    dF = [torch.randn(2, 8, 4, 4, generator=g)]
    _, out = server.open(site.seal(hdr("backward", 1, 2), dF), "backward")
    assert torch.equal(out[0], dF[0])
    _, out = site.open(server.seal(hdr("input-grad", 1, 2), dF), "input-grad")
    assert torch.equal(out[0], dF[0])


@pytest.mark.parametrize(("wire", "rtol"), [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_reduced_wire_dtype_round_trip_within_tolerance(wire, rtol):
    site, server = pair()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    full = site.seal(hdr(), [x])
    small = site.seal(hdr(), [x], wire_dtype=wire)
    assert len(small) < len(full) - x.numel()  # about half the payload bytes
    server.open(full, "forward")
    h, (y,) = server.open(small, "forward")
    assert y.dtype == torch.float32 and h.tensors[0].wire_dtype == wire
    torch.testing.assert_close(y, x, rtol=rtol, atol=1e-6)


def test_fp16_wire_overflow_refused_on_seal():
    site, _ = pair()
    with pytest.raises(SealError):
        site.seal(hdr(), [torch.tensor([1e6])], wire_dtype=torch.float16)


def test_seal_refuses_bad_input():
    site, _ = pair()
    with pytest.raises(SealError):
        site.seal(hdr(), [torch.arange(3)])  # integer dtype
    with pytest.raises(SealError):
        site.seal(hdr("features"), [torch.ones(1)])  # a site never sends features
    with pytest.raises(SealError):
        site.seal(FrameHeader(run_id="other", round=0, step=0, site=SITE, kind="forward"), [torch.ones(1)])
    with pytest.raises(SealError):
        site.seal(FrameHeader(run_id=RUN, round=0, step=0, site=SITE, kind="forward", sequence=7), [torch.ones(1)])


# -- published test vectors through the primitives layer ----------------------------------------

def test_rfc7748_x25519_section_6_1():
    a = prim.x25519_private_from_bytes(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    b = prim.x25519_private_from_bytes(bytes.fromhex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    a_pub, b_pub = prim.x25519_public_bytes(a), prim.x25519_public_bytes(b)
    assert a_pub.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert b_pub.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    k = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert prim.x25519_exchange(a, b_pub).hex() == k and prim.x25519_exchange(b, a_pub).hex() == k


def test_rfc5869_hkdf_test_case_1():
    okm = prim.hkdf_sha256(b"\x0b" * 22, salt=bytes.fromhex("000102030405060708090a0b0c"),
                           info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c"
                         "5db02d56ecc4c5bf34007208d5b887185865")


# -- attacks on sealed messages ------------------------------------------------------------------

def test_every_single_byte_flip_is_refused():
    site, server = pair()
    blob = site.seal(hdr(), [torch.randn(2, 3), torch.randn(4)])
    for i in range(len(blob)):  # version, header, ciphertext and tag
        bad = bytearray(blob)
        bad[i] ^= 0x01 if i % 2 else 0x80
        with pytest.raises(InvalidMessage):
            server.open(bytes(bad), "forward")
    server.open(blob, "forward")  # refused forgeries did not advance or poison the receiver


def test_truncated_and_extended_blobs_refused():
    site, server = pair()
    blob = site.seal(hdr(), [torch.randn(3)])
    for bad in (blob[:-1], blob + b"\x00", blob[:3], b""):
        with pytest.raises(InvalidMessage):
            server.open(bad, "forward")


def test_replay_refused():
    site, server = pair()
    blob = site.seal(hdr(), [torch.ones(2)])
    server.open(blob, "forward")
    with pytest.raises(InvalidMessage) as e:
        server.open(blob, "forward")
    assert reason(e) == "replay"


def test_reordering_refused():
    site, server = pair()
    first, second = site.seal(hdr(step=0), [torch.ones(2)]), site.seal(hdr(step=1), [torch.ones(2)])
    server.open(second, "forward")
    with pytest.raises(InvalidMessage) as e:
        server.open(first, "forward")
    assert reason(e) == "replay"


def test_other_session_and_reconnect_refused():
    site1, _ = pair()
    _, server2 = pair()  # a reconnect: new handshake, new keys, same run and site
    with pytest.raises(InvalidMessage) as e:
        server2.open(site1.seal(hdr(), [torch.ones(2)]), "forward")
    assert reason(e) == "authentication"


def test_cross_direction_refused():
    site, server = pair()
    up = site.seal(hdr("forward"), [torch.ones(2)])
    with pytest.raises(InvalidMessage):
        site.open(up, "features")  # a site->server blob reflected back to the site
    down = server.seal(hdr("features"), [torch.ones(2)])
    with pytest.raises(InvalidMessage):
        server.open(down, "forward")


def test_unexpected_kind_round_or_count_refused():
    site, server = pair()
    with pytest.raises(InvalidMessage) as e:
        server.open(site.seal(hdr("forward", 3, 0), [torch.ones(2)]), "backward")
    assert reason(e) == "unexpected"
    with pytest.raises(InvalidMessage):
        server.open(site.seal(hdr("forward", 3, 0), [torch.ones(2)]), Expect("forward", round=4))
    with pytest.raises(InvalidMessage):
        server.open(site.seal(hdr("forward", 3, 0), [torch.ones(2)]), Expect("forward", count=2))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_on_open(value):
    site, server = pair()
    blob = site.seal(hdr(), [torch.tensor([1.0, value, 2.0])])
    with pytest.raises(InvalidMessage) as e:
        server.open(blob, "forward")
    assert reason(e) == "non-finite"


def test_version_byte_refused():
    site, server = pair()
    blob = bytearray(site.seal(hdr(), [torch.ones(2)]))
    blob[0] = 2
    with pytest.raises(InvalidMessage) as e:
        server.open(bytes(blob), "forward")
    assert reason(e) == "version"


def _no_decrypt(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("decryption reached before bounds checks")
    monkeypatch.setattr(envelope.prim, "aead_decrypt", fail)


def test_huge_shape_in_sealed_header_refused_before_decryption(monkeypatch):
    site, server = pair()
    blob = bytearray(site.seal(hdr(), [torch.ones(2, 3)]))
    dims = struct.pack(">QQ", 2, 3)
    at = bytes(blob).index(dims)  # the authenticated shape fields
    blob[at:at + 16] = struct.pack(">QQ", 2**40, 2**40)
    _no_decrypt(monkeypatch)
    with pytest.raises(InvalidMessage) as e:
        server.open(bytes(blob), "forward")
    assert reason(e) == "too-large"


def _crafted(header: FrameHeader, body: bytes, head_len: int | None = None) -> bytes:
    head = encode_header(header)
    return PREFIX.pack(1, len(head) if head_len is None else head_len) + head + body


def test_crafted_unauthenticated_blobs_refused_before_decryption(monkeypatch):
    site, server = pair(max_payload_bytes=4096)
    _no_decrypt(monkeypatch)
    spec = TensorSpec(dtype=torch.float64, wire_dtype=torch.float64, shape=(2**31, 2**31, 2**31))
    forged = FrameHeader(run_id=RUN, round=0, step=0, site=SITE, kind="forward", direction="site-to-server",
                         sequence=0, tensors=(spec,))
    cases = {
        "too-large": _crafted(forged, bytes(64)),  # claims 2**96 bytes of float64
        "header-size": _crafted(forged, bytes(64), head_len=2**32 - 1),  # absurd header length
        "truncated": _crafted(forged, bytes(8), head_len=4000),  # header length past the end
        "length": _crafted(FrameHeader(**{**forged.__dict__, "tensors": (TensorSpec(torch.float32, torch.float32,
                                                                                  (4,)),)}), bytes(40)),
    }
    for want, blob in cases.items():
        with pytest.raises(InvalidMessage) as e:
            server.open(blob, "forward")
        assert reason(e) == want
    with pytest.raises(InvalidMessage) as e:  # ciphertext itself larger than the limit
        server.open(PREFIX.pack(1, 0) + bytes(8192), "forward")
    assert reason(e) == "too-large"
    bad_dtype = bytearray(_crafted(FrameHeader(**{**forged.__dict__, "tensors": (TensorSpec(torch.float32,
                                                  torch.float32, (1,)),)}), bytes(20)))
    bad_dtype[bytes(bad_dtype).index(b"\x00\x00\x01" + struct.pack(">Q", 1))] = 9  # unknown wire dtype code
    with pytest.raises(InvalidMessage) as e:
        server.open(bytes(bad_dtype), "forward")
    assert reason(e) == "header"


# -- handshake attacks ---------------------------------------------------------------------------

def _parties():
    site_key, server_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    return site_key, server_key, NonceCache()


def test_handshake_wrong_identity_key_refused():
    site_key, server_key, cache = _parties()
    impostor = Ed25519PrivateKey.generate()
    client = ClientHandshake(impostor, server_key.public_key(), RUN, SITE)
    with pytest.raises(HandshakeError) as e:
        ServerHandshake(server_key, site_key.public_key(), RUN, SITE, replay_cache=cache).respond(client.hello())
    assert reason(e) == "signature"
    client = ClientHandshake(site_key, server_key.public_key(), RUN, SITE)
    hello, _ = ServerHandshake(impostor, site_key.public_key(), RUN, SITE, replay_cache=cache).respond(client.hello())
    with pytest.raises(HandshakeError):
        client.finish(hello)


def test_handshake_tampered_hellos_refused():
    site_key, server_key, cache = _parties()
    server = ServerHandshake(server_key, site_key.public_key(), RUN, SITE, replay_cache=cache)
    client = ClientHandshake(site_key, server_key.public_key(), RUN, SITE)
    ch = client.hello()
    for i in range(len(ch)):
        bad = bytearray(ch)
        bad[i] ^= 0x04
        with pytest.raises(HandshakeError):
            server.respond(bytes(bad))
    sh, _ = server.respond(ch)
    for i in range(len(sh)):
        bad = bytearray(sh)
        bad[i] ^= 0x04
        with pytest.raises(HandshakeError):
            client.finish(bytes(bad))
    client.finish(sh)
    with pytest.raises(HandshakeError):
        client.finish(sh)  # single use


def test_handshake_replays_refused():
    site_key, server_key, cache = _parties()
    server = ServerHandshake(server_key, site_key.public_key(), RUN, SITE, replay_cache=cache)
    old_client = ClientHandshake(site_key, server_key.public_key(), RUN, SITE)
    old_server_hello, _ = server.respond(old_client.hello())
    with pytest.raises(HandshakeError) as e:
        server.respond(old_client.hello())  # replayed client hello
    assert reason(e) == "replay"
    new_client = ClientHandshake(site_key, server_key.public_key(), RUN, SITE)
    with pytest.raises(HandshakeError) as e:
        new_client.finish(old_server_hello)  # replayed server hello: bound to the old transcript
    assert reason(e) == "transcript"


def test_nonce_cache_is_bounded():
    cache = NonceCache(max_entries=2)
    for n in (b"a", b"b", b"c"):
        cache.add(n)
    cache.add(b"a")  # evicted, so accepted again; the bound keeps memory fixed
    with pytest.raises(HandshakeError):
        cache.add(b"c")


@pytest.mark.parametrize(("run_id", "site"), [("run-2", SITE), (RUN, "site-b")])
def test_handshake_mismatched_run_or_site_refused(run_id, site):
    site_key, server_key, cache = _parties()
    client = ClientHandshake(site_key, server_key.public_key(), run_id, site)
    with pytest.raises(HandshakeError) as e:
        ServerHandshake(server_key, site_key.public_key(), RUN, SITE, replay_cache=cache).respond(client.hello())
    assert reason(e) == "mismatch"


def test_session_repr_hides_keys():
    site, _ = pair()
    assert "key" not in repr(site).lower()


# -- chunking ------------------------------------------------------------------------------------

def test_chunks_round_trip_and_bounds():
    site, server = pair()
    blob = site.seal(hdr(), [torch.randn(50)])
    for size in (64, 100, len(blob) + 8, 10_000):
        chunks = split_chunks(blob, size)
        assert all(len(c) <= size for c in chunks)
        assert join_chunks(iter(chunks)) == blob
    server.open(join_chunks(split_chunks(blob, 64)), "forward")
    chunks = split_chunks(blob, 64)
    for bad in (chunks[:-1], [*chunks, b"x"], [], [b"abc"], [chunks[0], b"", *chunks[1:]]):
        with pytest.raises(InvalidMessage):
            join_chunks(bad)
    with pytest.raises(InvalidMessage):
        join_chunks([struct.pack(">Q", 2**40)], max_bytes=1 << 20)
    with pytest.raises(ValueError):
        split_chunks(blob, 8)


# -- property ------------------------------------------------------------------------------------

DT = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=0, max_size=3),
       dtype=st.sampled_from(DT), seed=st.integers(0, 2**31 - 1))
def test_property_open_seal_is_identity(shapes, dtype, seed):
    site, server = pair()
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(tuple(s), generator=g, dtype=torch.float64) * 10).to(dtype) for s in shapes]
    h, ys = server.open(site.seal(hdr(), xs), Expect("forward", count=len(xs)))
    for x, y in zip(xs, ys, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_a_value_that_overflows_only_in_the_declared_dtype_is_refused():
    """A finite bfloat16 on the wire can be beyond float16's range: the check is on what the receiver gets."""
    site, server = pair()
    blob = site.seal(hdr(), [torch.tensor([65504.0, 1.0], dtype=torch.float16)], wire_dtype=torch.bfloat16)
    with pytest.raises(InvalidMessage) as e:  # 65504 rounds to 65536 in bfloat16, which is inf in float16
        server.open(blob, "forward")
    assert reason(e) == "non-finite"

"""Fuzzing every decoder of peer or file input: only project errors may escape (issue 14, D9).

A decoder turns bytes (or JSON) from a peer or a file into objects. On hostile input it must raise a
:class:`~fedbone_med.errors.FedboneError` (the crypto and audit errors are subclasses) naming the failed
check, never a TypeError, OverflowError, RecursionError, RuntimeError, KeyError... (which the gRPC
server answers INTERNAL with a traceback in its log). A successful decode of a valid input is fine.

The peer is assumed to hold its session key (a site that passed the handshake, or a server): frames
are sealed for real, so the fuzz reaches every decoder behind the envelope's authentication.

Each test runs ``FEDBONE_FUZZ_EXAMPLES`` examples (default 1000); set it higher for a longer run, e.g.
``FEDBONE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_decoders.py``. Inputs are random bytes and
structure-aware mutations of valid messages (fields replaced by huge or negative integers, zero-size
dimensions beside huge ones, wrong types, deeply nested JSON, NaN, unicode, missing or extra keys).
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbone_med.audit import records as R
from fedbone_med.audit.canonical import canonical_json
from fedbone_med.audit.keys import key_id, load_private_key, load_public_key
from fedbone_med.audit.log import AuditLog, last_round
from fedbone_med.audit.proofs import check_bundle, consistency_bundle, inclusion_bundle
from fedbone_med.audit.samples import RUN as SAMPLE_RUN
from fedbone_med.audit.samples import sample_key, write_good_log
from fedbone_med.audit.verify import verify_log
from fedbone_med.crypto import _primitives as prim
from fedbone_med.crypto import handshake as hs
from fedbone_med.crypto.chunks import join_chunks, split_chunks
from fedbone_med.crypto.envelope import Session, _nonce
from fedbone_med.crypto.frame import PREFIX, WIRE_VERSION, FrameHeader, decode_header, encode_header
from fedbone_med.crypto.identity import load_ca, load_crl, load_registry, registry_from_json
from fedbone_med.crypto.kits import ServerKit, SiteKit
from fedbone_med.crypto.provision import provision
from fedbone_med.errors import FedboneError
from fedbone_med.models.split import CutSpec
from fedbone_med.transport import wire
from fedbone_med.transport.messages import JoinReply, JoinRequest, RoundReport, RoundSync, Schedule, StepHeader
from fedbone_med.transport.validate import check_activation, check_feature_grads

try:  # a site's reader of its own log (added with the site-side resume checks)
    from fedbone_med.audit.site_trail import check_site_log_resumable
except ImportError:  # pragma: no cover - an older tree
    check_site_log_resumable = None  # type: ignore[assignment]

EXAMPLES = int(os.environ.get("FEDBONE_FUZZ_EXAMPLES", 1000))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

RUN, SITE = "run-fuzz", "site-a"
CUT = CutSpec(16, (32, 64, 128), (2, 4, 8), max_batch=8, max_side=32)


def refused_or_decoded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a decoder: a result or a project error is fine; anything else fails the test (with its traceback)."""
    try:
        return fn(*args, **kwargs)
    except FedboneError as exc:
        assert str(exc), "a project error must say what failed"
        return None


# -- hostile values -------------------------------------------------------------------------------
HUGE_INTS = st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**31),
                             -(2**63), -(2**63) - 1, 10**30, 10**308, 10**309, 10**400, -(10**400), 2**1000])
SPECIAL_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, -1e308, 5e-324, 1e-320])
MAGIC_STRINGS = st.sampled_from(["", "NaN", "Infinity", "-Infinity", "nan", "inf", "float32", "float16", "bfloat16",
                                 "float64", "train", "eval", RUN, SITE, "join", "forward", "backward", "round-end",
                                 "ok", "leave", "\x00", "\ud800", "é" * 300, "a" * 257, "🩺" * 70, "/etc/passwd",
                                 "../x.png", "1e999", "-1", "0x10", " 1", "true", "null", "{}", "[]"])


def deep(depth: int, leaf: Any = 0, kind: str = "list") -> Any:
    """A value nested ``depth`` levels deep, built without recursion."""
    out = leaf
    for i in range(depth):
        out = [out] if (kind == "list" or (kind == "mixed" and i % 2)) else {"k": out}
    return out


scalars = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), SPECIAL_FLOATS,
                    st.text(max_size=12), MAGIC_STRINGS)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8) | MAGIC_STRINGS, inner, max_size=4), max_leaves=12)
hostile = st.one_of(
    scalars, json_like,
    st.builds(deep, st.integers(1, 40), st.sampled_from([0, None, "x", 10**400]),
              st.sampled_from(["list", "dict", "mixed"])),
    st.lists(HUGE_INTS | st.integers(-3, 3), max_size=70),
)


@st.composite
def mutated(draw: st.DrawFn, valid: Any, max_ops: int = 3) -> Any:
    """``valid`` with 1..max_ops random edits at random places (replace, delete, add a key, retype)."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        obj = _mutate_once(draw, obj)
    return obj


def _mutate_once(draw: st.DrawFn, obj: Any) -> Any:
    if isinstance(obj, dict) and obj and draw(st.integers(0, 4)):
        key = draw(st.sampled_from(sorted(obj)))
        op = draw(st.sampled_from(["replace", "replace", "recurse", "recurse", "delete", "add"]))
        if op == "replace":
            obj[key] = draw(hostile)
        elif op == "recurse":
            obj[key] = _mutate_once(draw, obj[key])
        elif op == "delete":
            del obj[key]
        else:
            obj[draw(st.text(max_size=8) | MAGIC_STRINGS)] = draw(hostile)
        return obj
    if isinstance(obj, list) and obj and draw(st.integers(0, 3)):
        i = draw(st.integers(0, len(obj) - 1))
        op = draw(st.sampled_from(["replace", "recurse", "delete", "append"]))
        if op == "replace":
            obj[i] = draw(hostile)
        elif op == "recurse":
            obj[i] = _mutate_once(draw, obj[i])
        elif op == "delete":
            del obj[i]
        else:
            obj.append(draw(hostile))
        return obj
    return draw(hostile)


# -- valid messages to mutate ---------------------------------------------------------------------
STEP = wire.step_to_json(StepHeader(RUN, SITE, 2, 17, 40, "train"))
JOIN = wire.join_request_to_json(JoinRequest(SITE, "fundus", "classification", 128, "0.1.0"))
JOIN_REPLY = wire.join_reply_to_json(JoinReply(RUN, CUT, 1, 20, "ab" * 32, Schedule(4, 10, 7, True, "float16")))
REPORT, REPORT_TENSORS = wire.round_report_to_wire(RoundReport(
    SITE, 2, 64, float("nan"), {"accuracy": 0.5, "kappa": -0.1}, {"w": torch.ones(2, 3), "b": torch.zeros(3)},
    "sig-1", {"epsilon": 1.5}))
SYNC, SYNC_TENSORS = wire.round_sync_to_wire(RoundSync(3, {"w": torch.ones(2, 3)}, (SITE, "site-b")))
LEAVE = {"epsilon": 2.5, "delta": 1e-5}


def tensor_lists() -> st.SearchStrategy[list[torch.Tensor]]:
    shapes = st.lists(st.integers(0, 3), max_size=4).map(tuple)
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    return st.lists(st.builds(lambda s, d: torch.zeros(s, dtype=d), shapes, dtypes), max_size=4)


# -- the JSON decoders, on mutated objects --------------------------------------------------------
@FUZZ
@given(mutated(STEP))
def test_fuzz_step_from_json(d: Any) -> None:
    refused_or_decoded(wire.step_from_json, d)


@FUZZ
@given(mutated(JOIN))
def test_fuzz_join_request_from_json(d: Any) -> None:
    refused_or_decoded(wire.join_request_from_json, d)


@FUZZ
@given(mutated(JOIN_REPLY, max_ops=4))
def test_fuzz_join_reply_from_json(d: Any) -> None:
    reply = refused_or_decoded(wire.join_reply_from_json, d)
    if reply is not None:  # what a site accepts from a server is bounded
        assert reply.cut.z_channels <= wire.MAX_CUT_CHANNELS and reply.cut.max_side <= 1 << 15


@FUZZ
@given(mutated(REPORT, max_ops=4), st.one_of(st.just(REPORT_TENSORS), tensor_lists()))
def test_fuzz_round_report_from_wire(d: Any, tensors: list[torch.Tensor]) -> None:
    refused_or_decoded(wire.round_report_from_wire, d, tensors)


@FUZZ
@given(mutated(SYNC), st.one_of(st.just(SYNC_TENSORS), tensor_lists()))
def test_fuzz_round_sync_from_wire(d: Any, tensors: list[torch.Tensor]) -> None:
    refused_or_decoded(wire.round_sync_from_wire, d, tensors)


@FUZZ
@given(st.one_of(mutated(LEAVE), hostile))
def test_fuzz_leave_privacy_from_wire(d: Any) -> None:
    out = refused_or_decoded(wire.leave_privacy_from_wire, SITE, d)
    if out is not None:
        eps, delta = out
        assert eps == eps and eps >= 0 and (delta is None or delta >= 0)  # finite, non-negative


# -- the meta codec: bytes -> JSON object ---------------------------------------------------------
def json_text(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def meta_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, JSON of mutated messages, or deeply nested JSON text (beyond the recursion limit)."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        body = draw(mutated(draw(st.sampled_from([STEP, JOIN, JOIN_REPLY, REPORT, SYNC, LEAVE]))))
        return json_text({"type": draw(st.sampled_from(wire.TYPES) | MAGIC_STRINGS), "body": body})
    if choice == 2:
        n = draw(st.sampled_from([31, 32, 33, 100, 999, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")]))
        return b'{"type":"join","body":' + opener * n + b"1" + closer * n + b"}"
    text = json_text({"type": "join", "body": JOIN})
    i = draw(st.integers(0, len(text)))
    return text[:i] + draw(st.binary(max_size=8) | st.sampled_from([b"NaN", b"1e999", b"9" * 5000, b'"\\ud800"']))


@FUZZ
@given(meta_bytes())
def test_fuzz_parse_json(raw: bytes) -> None:
    obj = refused_or_decoded(wire.parse_json, raw)
    if obj is not None:
        assert isinstance(obj, dict) and wire._depth(obj) <= wire.MAX_DEPTH


@FUZZ
@given(st.one_of(
    st.lists(st.integers(0, 255), max_size=200).map(lambda v: torch.tensor(v, dtype=torch.float16)),
    meta_bytes().map(lambda b: torch.tensor(list(b), dtype=torch.float16)),
    st.lists(st.floats(-65504, 65504, width=16), max_size=50).map(lambda v: torch.tensor(v, dtype=torch.float16)),
    st.builds(lambda s, d: torch.full(s, 65.0, dtype=d), st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from([torch.float16, torch.float32, torch.bfloat16])),
))
def test_fuzz_meta_from_tensor(t: torch.Tensor) -> None:
    refused_or_decoded(wire.meta_from_tensor, t)


# -- the frame header: bytes -> FrameHeader -------------------------------------------------------
DIMS = st.one_of(st.integers(0, 4), st.sampled_from([0, 1, 2**31, 2**32, 2**40, 2**40 + 1, 2**62, 2**63, 2**64 - 1]))


def raw_header(run: bytes, site: bytes, fixed: tuple[int, ...], specs: list[tuple[int, int, list[int]]]) -> bytes:
    """A header built byte by byte (no checks: what a hostile peer can write)."""
    out = struct.pack(">H", len(run)) + run + struct.pack(">H", len(site)) + site
    out += struct.pack(">QQQBBH", *fixed)
    for w, o, dims in specs:
        out += struct.pack(">BBB", w, o, len(dims)) + struct.pack(f">{len(dims)}Q", *dims)
    return out


SPECS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.lists(DIMS, max_size=9)), max_size=5)
# Empty tensors (a zero dimension) beside huge dimensions: no payload bytes, yet unallocatable shapes
ZERO_SIZE_SPECS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3),
                                     st.lists(DIMS, max_size=7).flatmap(
                                         lambda dims: st.permutations([0, *dims]))), min_size=1, max_size=3)
FIXED = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2),
                  st.integers(0, 4), st.integers(0, 5))


@st.composite
def header_bytes(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=200))
    specs, fixed = draw(SPECS | ZERO_SIZE_SPECS), draw(FIXED)
    if draw(st.booleans()):  # the tensor count agrees with the specs
        fixed = (*fixed[:5], len(specs))
    head = raw_header(draw(st.sampled_from([RUN.encode(), RUN.encode(), b"", b"\xff\xfe", b"x" * 257])),
                      draw(st.sampled_from([SITE.encode(), b"s"])), fixed, specs)
    if choice == 1:
        return head
    i = draw(st.integers(0, len(head)))  # splice random bytes into a structured header
    return head[:i] + draw(st.binary(max_size=16)) + head[i + draw(st.integers(0, 16)):]


@FUZZ
@given(header_bytes())
def test_fuzz_decode_header(data: bytes) -> None:
    h = refused_or_decoded(decode_header, data)
    if h is not None:  # whatever decodes can be allocated (empty tensors included)
        for s in h.tensors:
            if s.numel == 0:
                torch.empty(s.shape, dtype=s.wire_dtype)


# -- sealed frames from a peer holding the session key --------------------------------------------
def pair() -> tuple[Session, Session]:
    """(site session, server session) from a real handshake."""
    site_key, server_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    client = hs.ClientHandshake(site_key, server_key.public_key(), RUN, SITE)
    server = hs.ServerHandshake(server_key, site_key.public_key(), RUN, SITE, replay_cache=hs.NonceCache())
    hello, server_session = server.respond(client.hello())
    return client.finish(hello), server_session


def seal_raw(sender: Session, head: bytes, payload: bytes) -> bytes:
    """Seal ``payload`` behind an arbitrary header with the sender's key and next sequence number."""
    aad = PREFIX.pack(WIRE_VERSION, len(head)) + head
    blob = aad + prim.aead_encrypt(sender._send_key, _nonce(sender.send_direction, sender._next_send), payload, aad)
    sender._next_send += 1
    return blob


@st.composite
def hostile_frames(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """(header, payload, sequence) where the header's tensor specs are hostile and the payload may fit them."""
    seq = draw(st.integers(0, 3))
    specs = draw(SPECS | ZERO_SIZE_SPECS)
    head = raw_header(RUN.encode(), SITE.encode(), (0, 0, seq, 0, draw(st.sampled_from([0, 2])), len(specs)), specs)
    itemsize = {0: 4, 1: 2, 2: 2, 3: 8}
    declared = 0
    for w, _, dims in specs:
        n = itemsize.get(w, 4)
        for d in dims:
            n *= d
        declared += n
    if declared <= 4096 and draw(st.booleans()):
        payload = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f\x7f\x00\x00"])) * declared
        payload = payload[:declared].ljust(declared, b"\x00")
    else:
        payload = draw(st.binary(max_size=64))
    return head, payload, seq


@FUZZ
@given(hostile_frames())
def test_fuzz_session_open_hostile_specs(frame: tuple[bytes, bytes, int]) -> None:
    head, payload, seq = frame
    site, server = pair()
    site._next_send = seq
    blob = seal_raw(site, head, payload)
    for kind in ("forward", "backward"):
        refused_or_decoded(server.open, blob, kind)
    refused_or_decoded(server.open, blob[: len(blob) // 2], "forward")


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=8))
def test_fuzz_session_open_random_bytes(blob: bytes, prefix: bytes) -> None:
    _, server = pair()
    refused_or_decoded(server.open, blob, "forward")
    refused_or_decoded(server.open, prefix + blob, "backward")


LIMITS = wire.request_frame_limits(CUT, 1 << 30)


def server_decode(server: Session, blob: bytes, type_: str) -> None:
    """What the gRPC service does with a request of ``type_`` before the coordinator acts on it."""
    header, body, tensors = wire.open_message(server, blob, type_, max_bytes=LIMITS[type_])
    if type_ == "join":
        wire.join_request_from_json(body)
    elif type_ in ("forward", "backward"):
        wire.step_from_json(body)
        if type_ == "forward" and len(tensors) == 1:
            check_activation(tensors[0], CUT, SITE)
        if type_ == "backward":
            check_feature_grads(tensors, [torch.zeros(2, 32, 8, 8)], SITE)
    elif type_ == "round-end":
        wire.round_report_from_wire(body, tensors)
    elif type_ == "leave":
        wire.leave_privacy_from_wire(SITE, body)


def site_decode(site: Session, blob: bytes, type_: str) -> None:
    """What a site does with a reply of ``type_``."""
    _, body, tensors = wire.open_message(site, blob, type_)
    if type_ == "join-reply":
        wire.join_reply_from_json(body)
    elif type_ == "round-sync-reply":
        wire.round_sync_from_wire(body, tensors)


VALID_BODIES = {"join": JOIN, "forward": STEP, "backward": STEP, "round-end": REPORT, "leave": LEAVE,
                "round-sync": None, "join-reply": JOIN_REPLY, "round-sync-reply": SYNC, "features": None,
                "input-grad": None, "ok": None}
ACTIVATIONS = st.builds(lambda b, c, h, w, d, v: torch.full((b, c, h, w), v, dtype=d),
                        st.integers(0, 9), st.sampled_from([1, 16, 17]), st.integers(0, 33), st.integers(0, 33),
                        st.sampled_from([torch.float32, torch.float16, torch.float64]),
                        st.sampled_from([0.0, 1.0, -65504.0]))


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, str, torch.Tensor, list[torch.Tensor]]:
    """(type the receiver expects, type the meta claims, meta tensor, tensors) of a message a key holder sends."""
    type_ = draw(st.sampled_from(sorted(VALID_BODIES)))
    claimed = draw(st.sampled_from([type_, type_, draw(st.sampled_from(wire.TYPES))]))
    body = VALID_BODIES[type_]
    if draw(st.booleans()):
        body = draw(mutated(body)) if body is not None else draw(hostile)
    if draw(st.integers(0, 5)):
        meta = {"type": claimed, "body": body}
        if not draw(st.integers(0, 9)):
            meta = draw(mutated(meta))
        raw = json_text(meta)
    else:
        raw = draw(meta_bytes())
    meta_t = torch.tensor(list(raw), dtype=torch.float16)
    if type_ in ("round-end",):
        tensors = draw(st.one_of(st.just(REPORT_TENSORS), tensor_lists()))
    elif type_ == "round-sync-reply":
        tensors = draw(st.one_of(st.just(SYNC_TENSORS), tensor_lists()))
    elif type_ == "forward":
        tensors = draw(st.lists(ACTIVATIONS, max_size=2))
    else:
        tensors = draw(tensor_lists())
    return type_, claimed, meta_t, tensors


@FUZZ
@given(messages())
def test_fuzz_open_message_and_decoders(msg: tuple[str, str, torch.Tensor, list[torch.Tensor]]) -> None:
    type_, _, meta_t, tensors = msg
    site, server = pair()
    kind = wire.KIND_OF[type_]
    if kind in ("forward", "backward"):
        blob = site.seal(FrameHeader(run_id=RUN, round=0, step=0, site=SITE, kind=kind), [meta_t, *tensors])
        refused_or_decoded(server_decode, server, blob, type_)
    else:
        blob = server.seal(FrameHeader(run_id=RUN, round=0, step=0, site=SITE, kind=kind), [meta_t, *tensors])
        refused_or_decoded(site_decode, site, blob, type_)


# -- chunked frames -------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(
    st.lists(st.binary(max_size=80), max_size=6),
    st.builds(lambda b, n, cut: split_chunks(b, n)[:cut] if cut else split_chunks(b, n),
              st.binary(max_size=400), st.integers(64, 200), st.integers(0, 3)),
    st.builds(lambda total, rest: [struct.pack(">Q", total) + rest[0], *rest[1:]],
              HUGE_INTS.filter(lambda v: 0 <= v < 2**64) | st.integers(0, 300),
              st.lists(st.binary(max_size=100), min_size=1, max_size=4)),
))
def test_fuzz_join_chunks(chunks: list[bytes]) -> None:
    refused_or_decoded(join_chunks, iter(chunks), max_bytes=1 << 16)


# -- handshake hellos (signed by the holder of the identity key, so parsing goes past the signature) --
SITE_ID, SERVER_ID = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def resign(msg: bytes, key: Ed25519PrivateKey) -> bytes:
    body = msg[:-prim.ED25519_SIGNATURE_BYTES]
    return body + prim.ed25519_sign(key, hs._SIGN_DOMAIN + body)


@st.composite
def hello_mutation(draw: st.DrawFn, valid: bytes, key: Ed25519PrivateKey) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=400))
    body = bytearray(valid[:-prim.ED25519_SIGNATURE_BYTES])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["set", "insert", "delete", "length"]))
        if op == "set" and i < len(body):
            body[i] = draw(st.integers(0, 255))
        elif op == "insert":
            body[i:i] = draw(st.binary(min_size=1, max_size=40))
        elif op == "delete":
            del body[i:i + draw(st.integers(1, 40))]
        elif len(body) >= hs._FIXED.size + 2:  # a name length field set to anything
            struct.pack_into(">H", body, hs._FIXED.size, draw(st.sampled_from([0, 1, 255, 256, 257, 1000, 65535])))
    signed = resign(bytes(body) + bytes(prim.ED25519_SIGNATURE_BYTES), key)
    return signed if choice != 3 else signed[: draw(st.integers(0, len(signed)))]


def _client() -> hs.ClientHandshake:
    return hs.ClientHandshake(SITE_ID, SERVER_ID.public_key(), RUN, SITE)


def _server() -> hs.ServerHandshake:
    return hs.ServerHandshake(SERVER_ID, SITE_ID.public_key(), RUN, SITE, replay_cache=hs.NonceCache())


@FUZZ
@given(hello_mutation(_client().hello(), SITE_ID))
def test_fuzz_handshake_client_hello(hello: bytes) -> None:
    refused_or_decoded(_server().respond, hello)


@FUZZ
@given(st.data())
def test_fuzz_handshake_server_hello(data: st.DataObject) -> None:
    client = _client()
    valid, _ = _server().respond(client.hello())
    refused_or_decoded(client.finish, data.draw(hello_mutation(valid, SERVER_ID)))


# -- the audit log: lines of a file --------------------------------------------------------------
AUDIT_KEY = sample_key()
AUDIT_KEYS = {key_id(AUDIT_KEY.public_key()): AUDIT_KEY.public_key()}
_AUDIT_DIR = Path(tempfile.mkdtemp(prefix="fedbone-fuzz-audit-"))
atexit.register(shutil.rmtree, _AUDIT_DIR, True)
write_good_log(_AUDIT_DIR / "good.jsonl", AUDIT_KEY)
GOOD_LINES = (_AUDIT_DIR / "good.jsonl").read_bytes().split(b"\n")[:-1]


@st.composite
def audit_lines(draw: st.DrawFn) -> tuple[int, bytes]:
    """(index of the line replaced, its replacement): a mutated record re-encoded canonically, random bytes,
    deeply nested JSON, or bytes spliced into a valid line."""
    i = draw(st.integers(0, len(GOOD_LINES) - 1))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        env = json.loads(GOOD_LINES[i])
        line = json.dumps(draw(mutated(env, max_ops=3)), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=True).encode("utf-8", "surrogatepass")
    elif choice == 1:
        line = draw(st.binary(max_size=200)).replace(b"\n", b" ")
    elif choice == 2:
        n = draw(st.sampled_from([100, 999, 1000, 5000, 50_000]))
        line = b'{"body":' + b"[" * n + b"]" * n + b',"kind":"join","prev":"' + b"0" * 64 + b'","seq":0}'
    else:
        raw = GOOD_LINES[i]
        j = draw(st.integers(0, len(raw)))
        line = (raw[:j] + draw(st.binary(max_size=6) | st.sampled_from([b"NaN", b"1e999", b"9" * 5000]))
                + raw[j + draw(st.integers(0, 6)):]).replace(b"\n", b" ")
    return i, line


_LOG = _AUDIT_DIR / "fuzz.jsonl"


@FUZZ
@given(audit_lines())
def test_fuzz_audit_log_lines(case: tuple[int, bytes]) -> None:
    i, line = case
    lines = list(GOOD_LINES)
    lines[i] = line
    _LOG.write_bytes(b"".join(x + b"\n" for x in lines))
    refused_or_decoded(verify_log, _LOG, AUDIT_KEYS)
    refused_or_decoded(last_round, _LOG, SAMPLE_RUN, ("round", "round_backfill"))
    _LOG.write_bytes(b"".join(x + b"\n" for x in lines[: i + 1]))  # the line is the tail a writer reads
    log = refused_or_decoded(AuditLog, _LOG, AUDIT_KEY)
    if log is not None:
        log.close()


_SITE_LOG = _AUDIT_DIR / "site-fuzz.jsonl"


@FUZZ
@given(audit_lines())
def test_fuzz_site_log_state(case: tuple[int, bytes]) -> None:
    """A site reads its own log back on resume (which round it completed, whether the run is closed)."""
    if check_site_log_resumable is None:
        pytest.skip("no site-log resume check in this tree")
    i, line = case
    lines = list(GOOD_LINES)
    lines[i] = line
    _SITE_LOG.write_bytes(b"".join(x + b"\n" for x in lines))
    refused_or_decoded(check_site_log_resumable, _SITE_LOG, SAMPLE_RUN, "site-01", 0)


GOOD_REPORT = verify_log(_AUDIT_DIR / "good.jsonl", AUDIT_KEYS)
_CHECKPOINT_LINES = [n + 1 for n, raw in enumerate(GOOD_LINES) if b'"kind":"log_checkpoint"' in raw]
BUNDLES = [inclusion_bundle(GOOD_REPORT, 2),
           consistency_bundle(GOOD_REPORT, _CHECKPOINT_LINES[0], _CHECKPOINT_LINES[-1])]


@FUZZ
@given(st.sampled_from(BUNDLES).flatmap(lambda b: mutated(b, max_ops=3)),
       st.sampled_from([b"[" * 5000 + b"]" * 5000, b"NaN", b'{"seq":' + b"9" * 5000 + b"}", b""]))
def test_fuzz_proof_bundles(bundle: Any, line: bytes) -> None:
    """``fedbone-audit check-proof`` reads a bundle (JSON a third party hands the auditor; the CLI passes
    on JSON objects only)."""
    if not isinstance(bundle, dict):
        return
    refused_or_decoded(check_bundle, bundle, AUDIT_KEYS)
    for key in ("record", "checkpoint", "old_checkpoint"):
        if key in bundle:
            refused_or_decoded(check_bundle, {**bundle, key: line.decode()}, AUDIT_KEYS)


@FUZZ
@given(st.sampled_from(sorted(R.KINDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), mutated(json.loads(GOOD_LINES[0])["body"]) | hostile)))
def test_fuzz_audit_record_validate(case: tuple[str, Any]) -> None:
    kind, body = case
    refused_or_decoded(R.validate, R.KINDS[kind], body, kind)
    refused_or_decoded(canonical_json, body)


# -- file input: registry, keys, kits -------------------------------------------------------------
_KIT_DIR = Path(tempfile.mkdtemp(prefix="fedbone-fuzz-kits-"))
atexit.register(shutil.rmtree, _KIT_DIR, True)
provision(_KIT_DIR / "fed", ["a"], server_address="fedbone.example.org:50051")
REGISTRY = json.loads((_KIT_DIR / "fed" / "registry.json").read_text())


@FUZZ
@given(mutated(REGISTRY, max_ops=4))
def test_fuzz_registry(data: Any) -> None:
    refused_or_decoded(registry_from_json, data)


def _pem(label: str, der: bytes) -> bytes:
    import base64
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    return (f"-----BEGIN {label}-----\n".encode() + b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
            + f"\n-----END {label}-----\n".encode())


_OTHER_KEYS = [
    rsa.generate_private_key(65537, 1024).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()),
    ec.generate_private_key(ec.SECP384R1()).private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()),
    Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"pw")),
    Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo),
    rsa.generate_private_key(65537, 1024).public_key().public_bytes(serialization.Encoding.PEM,
                                                                    serialization.PublicFormat.SubjectPublicKeyInfo),
]
_SPLICE_BASES = _OTHER_KEYS + [(_KIT_DIR / "fed" / f).read_bytes() for f in
                               ("server/server.pem", "crl.pem", "server/identity-key.pem", "server/server-key.pem")]
KEY_FILES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(_OTHER_KEYS),
    st.tuples(st.sampled_from(["PRIVATE KEY", "PUBLIC KEY", "ENCRYPTED PRIVATE KEY", "EC PRIVATE KEY",
                               "RSA PRIVATE KEY", "CERTIFICATE", "OPENSSH PRIVATE KEY", "X509 CRL"]),
              st.binary(max_size=120)).map(lambda t: _pem(*t)),
    st.builds(lambda k, i, b: k[:i] + b + k[i + len(b):], st.sampled_from(_SPLICE_BASES), st.integers(0, 700),
              st.binary(min_size=1, max_size=4) | st.sampled_from([b"A", b"/", b"=", b"AAAA"])),
)
KIT_TARGETS = ["server/identity-key.pem", "server/server-key.pem", "server/server.pem", "server/ca.pem",
               "sites/a/identity-key.pem", "sites/a/server-identity.pub.pem", "sites/a/site-key.pem",
               "sites/a/site.pem", "sites/a/ca.pem", "registry.json", "crl.pem", "ca/ca.pem"]


@FUZZ
@given(st.sampled_from(KIT_TARGETS), KEY_FILES)
def test_fuzz_kit_files(target: str, content: bytes) -> None:
    work = _KIT_DIR / "work"
    if not work.exists():
        shutil.copytree(_KIT_DIR / "fed", work)
    path = work / target
    original = path.read_bytes()
    try:
        path.write_bytes(content)
        if not target.startswith("sites/"):
            refused_or_decoded(ServerKit.load, work)
        if not target.startswith("server/"):
            refused_or_decoded(SiteKit.load, work / "sites" / "a")
        if target == "registry.json":
            refused_or_decoded(load_registry, work)
        if target == "crl.pem":  # the server reads the CRL and the CA when it starts serving
            refused_or_decoded(load_crl, work)
        if target == "ca/ca.pem":
            refused_or_decoded(load_ca, work)
    finally:
        path.write_bytes(original)


@FUZZ
@given(KEY_FILES)
def test_fuzz_audit_key_files(content: bytes) -> None:
    path = _KIT_DIR / "audit-key.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    refused_or_decoded(load_private_key, path)
    refused_or_decoded(load_public_key, path)


# -- the envelope's own header codec round-trips what it accepts -----------------------------------
@FUZZ
@given(FIXED, SPECS)
def test_fuzz_decoded_headers_encode_back_to_the_same_bytes(fixed: tuple[int, ...], specs: list) -> None:
    head = raw_header(RUN.encode(), SITE.encode(), (*fixed[:5], len(specs)), specs)
    h = refused_or_decoded(decode_header, head)
    if h is not None:
        assert encode_header(h) == head


@pytest.mark.parametrize("shape", [(0, 2**64 - 1), (0, 2**63), (0, 2**40, 2**40), (2**32, 0, 2**32), (0,) * 8])
def test_zero_size_tensor_with_huge_dimensions_is_a_header_error(shape: tuple[int, ...]) -> None:
    """D9 regression: torch.empty((0, 2**64 - 1)) raised TypeError / RuntimeError in Session.open."""
    site, server = pair()
    head = raw_header(RUN.encode(), SITE.encode(), (0, 0, 0, 0, 0, 1), [(0, 0, list(shape))])
    blob = seal_raw(site, head, b"")
    if shape == (0,) * 8:
        assert server.open(blob, "forward")[1][0].shape == shape
        return
    with pytest.raises(FedboneError, match="too-large: a tensor shape claims more than"):
        server.open(blob, "forward")


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                 b'{"a":' + b"[" * 33 + b"]" * 33 + b"}"])
def test_deep_json_meta_is_a_protocol_error(raw: bytes) -> None:
    """D9 regression: RecursionError escaped parse_json."""
    with pytest.raises(FedboneError, match="nested deeper|JSON object"):
        wire.parse_json(raw)


@pytest.mark.parametrize("call", [
    lambda: wire.leave_privacy_from_wire(SITE, {"epsilon": 10**400, "delta": None}),
    lambda: wire.round_report_from_wire({**REPORT, "train_loss": 10**400}, REPORT_TENSORS),
    lambda: wire.round_report_from_wire({**REPORT, "metrics": {"a": -(10**309)}}, REPORT_TENSORS),
    lambda: wire.join_reply_from_json({**JOIN_REPLY, "schedule": {**JOIN_REPLY["schedule"], "wire_dtype": []}}),
    lambda: wire.join_reply_from_json({**JOIN_REPLY, "schedule": {**JOIN_REPLY["schedule"], "wire_dtype": {}}}),
    lambda: wire.join_reply_from_json({**JOIN_REPLY, "cut": {**JOIN_REPLY["cut"], "z_channels": 2**40}}),
])
def test_found_by_fuzzing_is_a_protocol_error(call: Callable[[], Any]) -> None:
    """D9 regressions: OverflowError (huge integers as floats) and TypeError (unhashable wire_dtype)."""
    with pytest.raises(FedboneError):
        call()


def test_deep_audit_line_is_an_audit_error(tmp_path: Path) -> None:
    """D9 regression: a deeply nested line made the log writer and its reconcile raise RecursionError."""
    from fedbone_med.audit.errors import AuditError

    path = tmp_path / "log.jsonl"
    write_good_log(path, AUDIT_KEY)
    path.write_bytes(path.read_bytes() + b'{"body":' + b"[" * 5000 + b"]" * 5000 + b',"seq":1}\n')
    with pytest.raises(AuditError):
        AuditLog(path, AUDIT_KEY)
    with pytest.raises(AuditError):
        last_round(path, SAMPLE_RUN, ("round",))
    with pytest.raises(AuditError):
        verify_log(path, AUDIT_KEYS)

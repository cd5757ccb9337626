"""The gRPC transport: mutual TLS + sealed envelope, exact over the wire, and refusing attacks."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import CLS5, site_cfg, tiny_server
from fedbone_med.crypto.provision import provision, revoke
from fedbone_med.data.sources import ArraySplit, SiteData
from fedbone_med.errors import ConfigError, ProtocolError
from fedbone_med.server import Coordinator
from fedbone_med.site import SiteRuntime
from fedbone_med.transport import InProcessTransport, JoinRequest, RoundReport, RoundSync, StepHeader, wire
from fedbone_med.transport.grpc_client import GrpcTransport, RemoteError
from fedbone_med.transport.grpc_service import bound_port, serve
from fedbone_med.transport.proto import fedbone_pb2 as pb
from fedbone_med.transport.proto import fedbone_pb2_grpc as pb_grpc

SITES = ("a", "b")


class Pki:
    def __init__(self, root: Path, sites: tuple[str, ...] = SITES) -> None:
        provision(root, list(sites))
        self.root = root
        self.ca = (root / "ca" / "ca.pem").read_bytes()
        self.server_cert = (root / "server" / "server.pem").read_bytes()
        self.server_key = (root / "server" / "server-key.pem").read_bytes()
        self.server_identity = Ed25519PrivateKey.generate()
        self.site_identity = {s: Ed25519PrivateKey.generate() for s in sites}

    def kit(self, site: str) -> tuple[bytes, bytes]:
        d = self.root / "sites" / site
        return (d / "site.pem").read_bytes(), (d / "site-key.pem").read_bytes()

    def serve(self, coord: Coordinator, **kw) -> tuple[grpc.Server, int]:
        kw.setdefault("address", "127.0.0.1:0")
        server = serve(coord, server_key_pem=self.server_key, server_cert_pem=self.server_cert,
                       ca_pem=self.ca, registry_dir=self.root, identity_key=self.server_identity,
                       site_keys={s: k.public_key() for s, k in self.site_identity.items()}, **kw)
        return server, bound_port(server)

    def transport(self, site: str, port: int, *, kit: tuple[bytes, bytes] | None = None, **kw) -> GrpcTransport:
        cert, key = kit or self.kit(site)
        return GrpcTransport(site, f"127.0.0.1:{port}", ca_pem=self.ca, cert_pem=cert, key_pem=key,
                             identity_key=self.site_identity[site],
                             server_public_key=self.server_identity.public_key(), timeout=60.0, **kw)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki") / "out")


def _canonical(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


class CanonicalInProcess(InProcessTransport):
    """In-process, but delivering tensors with standard contiguous strides, as the wire does.

    ``InProcessTransport`` keeps the server's strides (e.g. (B, C, 1, 1) maps strided like channels-last),
    and the site's head then takes other kernels: results differ in the last bits (~1e-5 relative after
    the backward pass). With the same layouts both transports are bit-equal.
    """

    def forward(self, header, z):
        return [_canonical(f) for f in super().forward(header, _canonical(z))]

    def backward(self, header, grads):
        return _canonical(super().backward(header, [_canonical(g) for g in grads]))


def _data(seed: int, n: int = 8, size: int = 32) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, CLS5.num_classes, (n,), generator=g)
    split = ArraySplit(x, y)
    return SiteData(split, split)


# -- wire codecs ---------------------------------------------------------------------------------
def test_wire_round_trips_and_is_strict():
    report = RoundReport("a", 3, 10, float("nan"), {"auc": 0.5, "x": math.inf}, {"w": torch.ones(2, 2)}, "sig")
    meta, tensors = wire.round_report_to_wire(report)
    raw = wire.canonical_json(meta)
    back = wire.round_report_from_wire(wire.parse_json(raw), tensors)
    assert math.isnan(back.train_loss) and back.metrics == {"auc": 0.5, "x": math.inf}
    assert back.embedding is not None and torch.equal(back.embedding["w"], torch.ones(2, 2))
    with pytest.raises(ProtocolError, match="unknown keys"):
        wire.round_report_from_wire({**meta, "image": "x"}, tensors)
    with pytest.raises(ProtocolError, match="names for"):
        wire.round_report_from_wire(meta, [])
    with pytest.raises(ProtocolError, match="integer"):
        wire.step_from_json({**wire.step_to_json(StepHeader("r", "a", 0, 0, 1)), "round": True})
    with pytest.raises(ProtocolError, match="duplicate"):
        wire.parse_json(b'{"a":1,"a":2}')
    with pytest.raises(ProtocolError):
        wire.parse_json(b'{"a":NaN}')
    meta = wire.meta_from_tensor(wire.meta_tensor({"type": "ok", "body": None}))
    assert meta == {"type": "ok", "body": None}
    sync_meta, sync_t = wire.round_sync_to_wire(RoundSync(1, None, ("a",)))
    assert wire.round_sync_from_wire(sync_meta, sync_t) == RoundSync(1, None, ("a",))


# -- 1. split exactness over the wire ------------------------------------------------------------
def _coordinator() -> Coordinator:
    coord = Coordinator(tiny_server("mean"), run_id="run-1", seed=0)
    # A second joined site keeps the step open, so the site's gradient slot stays readable.
    coord.join(JoinRequest("placeholder", "fundus", "classification", 1, "test"))
    return coord


def test_split_over_grpc_equals_in_process(pki, servers):
    cfg = site_cfg("a", "dr_grade", "fundus", CLS5)
    data = _data(0)
    x, y = data.train.images, data.train.targets

    coord_i = _coordinator()
    site_i = SiteRuntime(cfg, CanonicalInProcess(coord_i), data, seed=3)
    site_i.join()
    loss_i = site_i.forward_backward(x, y, round=0, step=0)

    coord_g = _coordinator()
    server, port = pki.serve(coord_g)
    servers.append(server)
    with pki.transport("a", port) as transport:
        assert transport.run_id == "run-1"
        site_g = SiteRuntime(cfg, transport, data, seed=3)
        site_g.join()
        loss_g = site_g.forward_backward(x, y, round=0, step=0)

    assert loss_g == loss_i  # bit-equal: the wire carries raw float32 bytes
    grads_i = dict(site_i.model.named_parameters())
    for name, p in site_g.model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, grads_i[name].grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(coord_g.slots["a"], coord_i.slots["a"], rtol=0, atol=0)

    # Against the plain InProcessTransport, which keeps the server's strides: the head takes other kernels, so
    # only close (differences up to ~4e-4 of a tensor's largest gradient).
    coord_p = _coordinator()
    site_p = SiteRuntime(cfg, InProcessTransport(coord_p), data, seed=3)
    site_p.join()
    assert site_p.forward_backward(x, y, round=0, step=0) == pytest.approx(loss_g, rel=1e-6)
    grads_p = dict(site_p.model.named_parameters())
    for name, p in site_g.model.named_parameters():
        ref = grads_p[name].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-3 * float(ref.abs().max()), msg=name)
    ref = coord_p.slots["a"]
    torch.testing.assert_close(coord_g.slots["a"], ref, rtol=1e-5, atol=1e-3 * float(ref.abs().max()))


# -- 2. a short federation -----------------------------------------------------------------------
ROUNDS, STEPS = 2, 2


def _sites(transports) -> list[SiteRuntime]:
    return [SiteRuntime(site_cfg(s, "dr_grade", "fundus", CLS5, n_train=8, n_val=8, batch=4), transports[s],
                        _data(i + 1), seed=7) for i, s in enumerate(SITES)]


def _run_site(site: SiteRuntime) -> None:
    for rnd in range(ROUNDS):
        for i in range(STEPS):
            site.train_step(rnd, rnd * STEPS + i, i)
        site.end_round(rnd, {"primary": 0.5}, share_embedding=True)
        assert site.sync_round(rnd) == SITES


def test_two_site_federation_over_grpc_matches_in_process(pki, servers):
    coord_i = Coordinator(tiny_server("projection"), run_id="run-2", seed=0)
    sites_i = _sites({s: CanonicalInProcess(coord_i) for s in SITES})
    for s in sites_i:
        s.join()
    for rnd in range(ROUNDS):
        for i in range(STEPS):
            for s in sites_i:
                s.train_step(rnd, rnd * STEPS + i, i)
        for s in sites_i:
            s.end_round(rnd, {"primary": 0.5}, share_embedding=True)
        for s in sites_i:
            s.sync_round(rnd)

    coord_g = Coordinator(tiny_server("projection"), run_id="run-2", seed=0, wait_timeout=60)
    server, port = pki.serve(coord_g)
    servers.append(server)
    transports = {s: pki.transport(s, port) for s in SITES}
    sites_g = _sites(transports)
    # Join one after the other: SiteRuntime.join builds the model under torch.random.fork_rng, which
    # seeds the process-global generator, so two joins racing in one process would mix their seeds.
    for s in sites_g:
        s.join()
    errors: list[BaseException] = []

    def run(site: SiteRuntime) -> None:
        try:
            _run_site(site)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in sites_g]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for s in SITES:
        transports[s].leave(s)
        transports[s].close()
    assert not coord_g.sites

    assert coord_g.step == coord_i.step == ROUNDS * STEPS
    for (name, a), b in zip(coord_g.backbone.state_dict().items(), coord_i.backbone.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), f"backbone {name} differs"
    for sg, si in zip(sites_g, sites_i, strict=True):
        for (name, a), b in zip(sg.model.state_dict().items(), si.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"site {sg.name} {name} differs"


# -- 3. attacks ----------------------------------------------------------------------------------
def _raw_stub(pki: Pki, port: int, cert: bytes, key: bytes) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    return channel, pb_grpc.FederationStub(channel)


@pytest.fixture
def served(pki, servers) -> tuple[Coordinator, int]:
    coord = Coordinator(tiny_server("mean"), run_id="run-3", seed=0, wait_timeout=5)
    server, port = pki.serve(coord)
    servers.append(server)
    return coord, port


def test_certificate_from_another_ca_is_refused(pki, served, tmp_path):
    _, port = served
    other = Pki(tmp_path / "other", ("a",))
    with pytest.raises(RemoteError) as info:
        pki.transport("a", port, kit=other.kit("a"))
    assert info.value.code in ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED")


def test_a_site_cannot_speak_for_another(pki, served):
    _, port = served
    channel, stub = _raw_stub(pki, port, *pki.kit("a"))
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(pb.HandshakeRequest(site="b"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "cannot speak for site 'b'" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Forward(pb.Sealed(site="b", sealed=b"x" * 64), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _sealed_forward(t: GrpcTransport, seq: int) -> bytes:
    assert t._session is not None
    header = StepHeader(t.run_id or "", t.site, 0, 0, seq, "eval")
    return wire.seal_message(t._session, "forward", wire.step_to_json(header), [torch.rand(1, 16, 8, 8)])


def test_replayed_and_tampered_frames_are_refused(pki, served):
    _, port = served
    with pki.transport("a", port) as t:
        t.join(JoinRequest("a", "fundus", "classification", 8, "test"))
        blob = _sealed_forward(t, 1)
        t._stub.Forward(pb.Sealed(site="a", sealed=blob), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            t._stub.Forward(pb.Sealed(site="a", sealed=blob), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replay" in info.value.details()

        bad = bytearray(_sealed_forward(t, 2))
        bad[-20] ^= 1
        with pytest.raises(grpc.RpcError) as info:
            t._stub.Forward(pb.Sealed(site="a", sealed=bytes(bad)), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "authentication" in info.value.details()

        # A frame sealed for one RPC cannot be sent to another.
        with pytest.raises(grpc.RpcError) as info:
            t._stub.Join(pb.Sealed(site="a", sealed=_sealed_forward(t, 3)), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unexpected" in info.value.details()

        # After a reconnect (re-key) the transport works again; nothing leaks tensor values in errors.
        t.reconnect()
        feats = t.forward(StepHeader(t.run_id or "", "a", 0, 0, 10, "eval"), torch.rand(1, 16, 8, 8))
        assert len(feats) == 4


def test_insecure_dev_refuses_non_loopback_addresses(pki):
    coord = Coordinator(tiny_server("mean"), run_id="r", seed=0)
    for address in ("0.0.0.0:0", "10.1.2.3:0", "[::]:0", "example.org:0"):
        with pytest.raises(ConfigError, match="loopback"):
            pki.serve(coord, address=address, insecure_dev=True)


def test_insecure_dev_on_loopback_still_uses_the_sealed_envelope(pki, servers):
    coord = Coordinator(tiny_server("mean"), run_id="dev", seed=0)
    server, port = pki.serve(coord, insecure_dev=True)
    servers.append(server)
    t = GrpcTransport("a", f"127.0.0.1:{port}", ca_pem=None, cert_pem=None, key_pem=None, insecure_dev=True,
                      identity_key=pki.site_identity["a"], server_public_key=pki.server_identity.public_key())
    with t:
        assert t.join(JoinRequest("a", "fundus", "classification", 8, "test")).run_id == "dev"
    # Without the site's handshake identity key there is no session, even on loopback.
    with pytest.raises(RemoteError) as info:
        GrpcTransport("a", f"127.0.0.1:{port}", ca_pem=None, cert_pem=None, key_pem=None, insecure_dev=True,
                      identity_key=pki.site_identity["b"], server_public_key=pki.server_identity.public_key())
    assert info.value.code == "PERMISSION_DENIED" and "signature" in info.value.details


def test_revoked_site_is_refused_after_restart(pki, served, servers, tmp_path):
    revoked = Pki(tmp_path / "rev")
    coord, _ = served
    server, port = revoked.serve(coord)
    servers.append(server)
    revoked.transport("b", port).close()  # accepted before revocation
    revoke(revoked.root, "b")
    server.stop(0)
    server, port = revoked.serve(coord)  # restarted: reads the new CRL and registry
    servers.append(server)
    with pytest.raises(RemoteError) as info:
        revoked.transport("b", port)
    assert info.value.code == "PERMISSION_DENIED" and "revoked" in info.value.details
    revoked.transport("a", port).close()  # the others are unaffected


# -- 4. what leaves a site, and the reduced wire dtype -------------------------------------------
class _Recorder:
    """Stands in for the client's ``wire`` module: records every message a site seals, then seals it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object, list[torch.Tensor], int]] = []

    def __getattr__(self, name: str):
        return getattr(wire, name)

    def seal_message(self, session, type_, body, tensors, **kw):
        blob = wire.seal_message(session, type_, body, tensors, **kw)
        self.sent.append((type_, body, [t.detach().clone() for t in tensors], len(blob)))
        return blob


def test_only_activations_and_feature_gradients_of_the_declared_shapes_leave_a_site(pki, servers, monkeypatch):
    from fedbone_med.transport import grpc_client

    recorder = _Recorder()
    monkeypatch.setattr(grpc_client, "wire", recorder)
    cfg = site_cfg("a", "dr_grade", "fundus", CLS5, n_train=8, n_val=8, batch=4)
    data = _data(5)
    coord = Coordinator(tiny_server("mean"), run_id="run-1", seed=0, wait_timeout=30)
    server, port = pki.serve(coord)
    servers.append(server)
    with pki.transport("a", port) as transport:
        site = SiteRuntime(cfg, transport, data, seed=1)
        site.join()
        for i in range(2):
            site.train_step(0, i, i)
        site.end_round(0, {}, share_embedding=True)
        site.evaluate(0, 1)
        site.leave()
    cut = site.cut
    images = data.train.images.numpy().astype("float32")
    image_rows = {images[i, c, r].tobytes() for i in range(len(images)) for c in range(3) for r in range(0, 32, 8)}
    embedding = {k: tuple(v.shape) for k, v in site.model.embedding.state_dict().items()}
    types = [t for t, *_ in recorder.sent]
    assert set(types) == {"join", "forward", "backward", "round-end", "leave"}
    for type_, body, tensors, _ in recorder.sent:
        for t in tensors:
            assert t.dtype == torch.float32
            assert t.dim() != 4 or t.shape[-2:] != images.shape[-2:], f"an image-sized tensor in a {type_} message"
            raw = t.numpy().tobytes()
            assert not any(row in raw for row in image_rows), f"image bytes inside a {type_} message"
        if type_ == "forward":
            (z,) = tensors
            assert z.shape[1] == cut.z_channels and z.shape[0] <= 8 and z.shape[2] == 32 // cfg.model.stride
        elif type_ == "backward":
            assert [g.shape[1] for g in tensors] == list(cut.feature_channels)
        elif type_ == "round-end":
            assert sorted(body["embedding"]) == sorted(embedding) and set(body["metrics"]) == set()
            assert [tuple(t.shape) for t in tensors] == [embedding[k] for k in body["embedding"]]
        else:
            assert not tensors
    assert "labels" not in json.dumps([b for _, b, _, _ in recorder.sent])


def test_fp16_wire_halves_the_bytes_and_stays_close_to_float32(pki, servers, monkeypatch):
    from fedbone_med.transport import grpc_client

    cfg = site_cfg("a", "dr_grade", "fundus", CLS5)
    data = _data(0)
    x, y = data.train.images, data.train.targets
    sizes = {}
    grads = {}
    for dtype in (None, torch.float16):
        recorder = _Recorder()
        monkeypatch.setattr(grpc_client, "wire", recorder)
        coord = _coordinator()
        server, port = pki.serve(coord, wire_dtype=dtype)
        servers.append(server)
        with pki.transport("a", port) as transport:
            transport.wire_dtype = dtype
            site = SiteRuntime(cfg, transport, data, seed=3)
            site.join()
            site.forward_backward(x, y, round=0, step=0)
        sizes[dtype] = sum(n for t, _, _, n in recorder.sent if t in ("forward", "backward"))
        grads[dtype] = coord.slots["a"].clone()
    assert 0.45 < sizes[torch.float16] / sizes[None] < 0.55
    # Rounding z and F to float16 moves this freshly initialised model's backbone gradient by ~7 % of its
    # norm (bfloat16: ~11 %): the attention head amplifies the rounding. The direction is kept.
    ref, half = grads[None], grads[torch.float16]
    assert float(torch.nn.functional.cosine_similarity(half, ref, dim=0)) > 0.99
    assert not torch.equal(half, ref)


# -- 5. frames larger than one gRPC message are streamed in chunks -------------------------------
def test_frames_above_the_message_limit_are_streamed_and_give_the_same_result(pki, servers, monkeypatch):
    from fedbone_med.transport import grpc_client

    cfg = site_cfg("a", "dr_grade", "fundus", CLS5)
    data = _data(0)
    x, y = data.train.images, data.train.targets
    results = {}
    real = grpc_client.GrpcTransport._call_stream
    for limit in (None, 64 << 10):  # z here is ~300 KiB: with a 64 KiB limit every frame is chunked
        kw = {} if limit is None else {"max_message_bytes": limit}
        coord = _coordinator()
        server, port = pki.serve(coord, **kw)
        servers.append(server)
        calls: list[str] = []
        monkeypatch.setattr(grpc_client.GrpcTransport, "_call_stream",
                            lambda self, name, blob, calls=calls: calls.append(name) or real(self, name, blob))
        with pki.transport("a", port, **kw) as transport:
            site = SiteRuntime(cfg, transport, data, seed=3)
            site.join()
            loss = site.forward_backward(x, y, round=0, step=0)
        results[limit] = (loss, coord.slots["a"].clone(), calls)
    (loss_u, slot_u, calls_u), (loss_s, slot_s, calls_s) = results[None], results[64 << 10]
    assert calls_u == [] and calls_s == ["ForwardStream", "BackwardStream"]
    assert loss_s == loss_u and torch.equal(slot_s, slot_u)


def test_an_oversized_streamed_frame_is_refused_before_it_is_buffered(pki, served):
    import struct

    _, port = served
    with pki.transport("a", port) as t:  # a stream is read only from a site with a session
        first = pb.Chunk(site="a", data=struct.pack(">Q", 1 << 40) + b"x" * 16)  # declares 1 TiB
        with pytest.raises(grpc.RpcError) as err:
            list(t._stub.ForwardStream(iter([first]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declared length exceeds the limit" in err.value.details()


def test_a_leave_body_carries_only_a_finite_privacy_spend() -> None:
    from fedbone_med.transport import wire

    assert wire.leave_privacy_from_wire("a", None) is None
    assert wire.leave_privacy_from_wire("a", {"epsilon": 1.5, "delta": None}) == (1.5, None)
    assert wire.leave_privacy({"epsilon": 2, "delta": 1e-5, "noise_multiplier": 1.0}) == (2.0, 1e-5)
    assert wire.leave_privacy({}) is None and wire.leave_privacy(None) is None
    for bad in ({"epsilon": float("nan"), "delta": None}, {"epsilon": -1.0, "delta": None}, {"epsilon": True,
                "delta": None}, {"epsilon": 1.0}, {"epsilon": 1.0, "delta": None, "extra": 1}, [1.0, None],
                {"epsilon": 1.0, "delta": "x"}):
        with pytest.raises(ProtocolError, match="leave"):
            wire.leave_privacy_from_wire("a", bad)

"""Transport faults from the adversarial review (issue 14), each against a real gRPC server with mutual TLS.

- D4: a streamed frame from a peer that will be refused (revoked certificate, no session) is refused
  before the server reads it, in constant memory.
- D5: a client hello captured on the wire is refused when replayed, in the same server launch and after
  a restart with the same run id (``serve --resume``), and never replaces the genuine site's session.
- D6: one site cannot occupy every worker thread with calls that wait for a future step; the other
  sites still get through.

The certificates and identity keys come from the project's provisioning (``provision``, ``revoke``,
``ServerKit``/``SiteKit``), as ``fedbone-server serve`` and ``fedbone-site train`` load them.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from conftest import tiny_server
from fedbone_med.crypto.errors import HandshakeError
from fedbone_med.crypto.handshake import ChallengeBook
from fedbone_med.crypto.kits import ServerKit, SiteKit
from fedbone_med.crypto.provision import provision, revoke
from fedbone_med.server import Coordinator
from fedbone_med.transport import JoinRequest, StepHeader, wire
from fedbone_med.transport.grpc_client import GrpcTransport
from fedbone_med.transport.grpc_service import DEFAULT_MAX_CALLS_PER_SITE, bound_port, serve
from fedbone_med.transport.proto import fedbone_pb2 as pb
from fedbone_med.transport.proto import fedbone_pb2_grpc as pb_grpc

SITES = ("a", "b", "c")  # c is revoked
Z = (1, 16, 8, 8)  # an activation the tiny backbone accepts


class Federation:
    """A provisioned directory: the server's kit and each site's startup kit, loaded as the CLIs do."""

    def __init__(self, root: Path) -> None:
        provision(root, list(SITES))
        revoke(root, "c")
        self.root = root
        self.server = ServerKit.load(root)
        self.kits = {s: SiteKit.load(root / "sites" / s) for s in SITES}

    def serve(self, coord: Coordinator, **kw) -> tuple[grpc.Server, int]:
        k = self.server
        server = serve(coord, address="127.0.0.1:0", server_key_pem=k.key_pem, server_cert_pem=k.cert_pem,
                       ca_pem=k.ca_pem, registry_dir=k.root, identity_key=k.identity_key, site_keys=k.site_keys,
                       **kw)
        return server, bound_port(server)

    def transport(self, site: str, port: int, *, cls: type[GrpcTransport] = GrpcTransport,
                  timeout: float = 60.0) -> GrpcTransport:
        kit = self.kits[site]
        return cls(site, f"127.0.0.1:{port}", ca_pem=kit.ca_pem, cert_pem=kit.cert_pem, key_pem=kit.key_pem,
                   identity_key=kit.identity_key, server_public_key=kit.server_identity, timeout=timeout)

    def stub(self, site: str, port: int) -> tuple[grpc.Channel, pb_grpc.FederationStub]:
        """A bare channel with ``site``'s TLS certificate (what an attacker holding that kit file could open)."""
        kit = self.kits[site]
        creds = grpc.ssl_channel_credentials(root_certificates=kit.ca_pem, private_key=kit.key_pem,
                                             certificate_chain=kit.cert_pem)
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        return channel, pb_grpc.FederationStub(channel)


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    return Federation(tmp_path_factory.mktemp("faults") / "pki")


def _join(t: GrpcTransport) -> None:
    t.join(JoinRequest(t.site, "fundus", "classification", 8, "test"))


def _eval_forward(t: GrpcTransport, sequence: int) -> list[torch.Tensor]:
    return t.forward(StepHeader(t.run_id or "", t.site, 0, 0, sequence, "eval"), torch.rand(*Z))


# -- D4: a streamed frame is refused before it is read ---------------------------------------------
MESSAGE = 64 << 10  # the server's gRPC message limit here: a frame travels in 64 KiB chunks
FRAME = 48 << 20  # the frame the refused peer streams: 768 chunks


def _chunks(site: str, taken: list[int]) -> Iterator[pb.Chunk]:
    """A FRAME-byte frame in MESSAGE-sized chunks (the first declares the length); counts what gRPC takes."""
    body = b"\x00" * MESSAGE
    first = struct.pack(">Q", FRAME) + body[:-8]
    left = FRAME - (len(first) - 8)
    yield pb.Chunk(site=site, data=first)
    taken[0] += 1
    while left:
        yield pb.Chunk(site=site, data=body[:left])
        taken[0] += 1
        left -= min(left, MESSAGE)


@pytest.mark.parametrize(("site", "code", "check"), [
    ("c", grpc.StatusCode.PERMISSION_DENIED, "revoked"),  # CA-signed, but revoked after provisioning
    ("b", grpc.StatusCode.FAILED_PRECONDITION, "no session"),  # a valid certificate that never handshook
])
def test_a_streamed_frame_from_a_refused_peer_is_refused_before_it_is_read(fed, servers, site, code, check):
    coord = Coordinator(tiny_server("mean"), run_id="run-d4", seed=0, wait_timeout=10)
    server, port = fed.serve(coord, max_message_bytes=MESSAGE)
    servers.append(server)
    channel, stub = fed.stub(site, port)
    taken = [0]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with channel, pytest.raises(grpc.RpcError) as err:
            list(stub.ForwardStream(_chunks(site, taken), timeout=60))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code() == code and check in err.value.details()
    # The server (in this process) refused without buffering the frame: before, it reassembled all of it
    # (a peak above FRAME) and only then checked the peer, pulling every chunk from the client.
    assert peak < FRAME // 8, f"{peak} bytes allocated while refusing a {FRAME}-byte stream"
    assert taken[0] < FRAME // MESSAGE // 4, f"the client streamed {taken[0]} chunks before the refusal"


# -- D5: a replayed client hello ------------------------------------------------------------------
class _Tapped(GrpcTransport):
    """A genuine site, with an eavesdropper on the path (e.g. a TLS-terminating proxy) copying its hellos."""

    tap: list[pb.HandshakeRequest] = []

    def _call(self, name, request):
        if name == "Handshake" and request.client_hello:
            type(self).tap.append(request)
        return super()._call(name, request)


def _replay(fed: Federation, port: int, hello: pb.HandshakeRequest) -> grpc.RpcError:
    channel, stub = fed.stub(hello.site, port)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Handshake(hello, timeout=30)
    return err.value


_SERVER_PROCESS = """
import sys
sys.path.insert(0, sys.argv[3])
from conftest import tiny_server
from fedbone_med.crypto.kits import ServerKit
from fedbone_med.server import Coordinator
from fedbone_med.transport.grpc_service import bound_port, serve
kit = ServerKit.load(sys.argv[1])
coord = Coordinator(tiny_server("mean"), run_id=sys.argv[2], seed=0, wait_timeout=30)
server = serve(coord, address="127.0.0.1:0", server_key_pem=kit.key_pem, server_cert_pem=kit.cert_pem,
               ca_pem=kit.ca_pem, registry_dir=kit.root, identity_key=kit.identity_key, site_keys=kit.site_keys)
print(bound_port(server), flush=True)
sys.stdin.read()
server.stop(0)
"""


class _ServerProcess:
    """A server in its own process (so nothing of one launch survives into the next), stopped on exit."""

    def __init__(self, root: Path, run_id: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS, str(root), run_id,
                                      str(Path(__file__).parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.close()
            raise AssertionError(f"the server process did not start (exit code {self.proc.returncode})")
        self.port = int(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> _ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_a_hello_captured_before_a_restart_is_refused_after_it(fed):
    _Tapped.tap = []
    with _ServerProcess(fed.root, "run-d5") as first:
        with fed.transport("a", first.port, cls=_Tapped) as t:
            _join(t)
    (captured,) = _Tapped.tap
    with _ServerProcess(fed.root, "run-d5") as restarted:  # serve --resume: a new process, the same run id
        with fed.transport("a", restarted.port) as genuine:
            _join(genuine)
            assert len(_eval_forward(genuine, 1)) == 4
            err = _replay(fed, restarted.port, captured)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "challenge" in err.details() and "handshake again" in err.details()
            # The genuine site's session was not replaced: its next frames still open.
            assert len(_eval_forward(genuine, 2)) == 4
            _join(genuine)


def test_a_replayed_or_forged_hello_never_replaces_the_live_session(fed, servers):
    coord = Coordinator(tiny_server("mean"), run_id="run-d5b", seed=0, wait_timeout=10)
    server, port = fed.serve(coord)
    servers.append(server)
    _Tapped.tap = []
    with fed.transport("a", port, cls=_Tapped) as genuine:
        _join(genuine)
        (captured,) = _Tapped.tap
        err = _replay(fed, port, captured)  # the same launch: the challenge is spent
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "challenge" in err.details()
        forged = bytearray(captured.client_hello)
        forged[-1] ^= 1
        err = _replay(fed, port, pb.HandshakeRequest(site="a", client_hello=bytes(forged)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "signature" in err.details()
        # A challenge fetched (by anyone holding a's certificate) and never answered changes nothing either.
        channel, stub = fed.stub("a", port)
        with channel:
            assert len(stub.Handshake(pb.HandshakeRequest(site="a"), timeout=30).server_hello) == 32
        assert len(_eval_forward(genuine, 1)) == 4
        # and a real reconnect still re-keys
        genuine.reconnect()
        _join(genuine)
        assert len(_eval_forward(genuine, 2)) == 4


def test_challenges_are_single_use_expire_and_are_bounded():
    now = [0.0]
    book = ChallengeBook(ttl=120.0, per_site=2, clock=lambda: now[0])
    c1, c2 = book.issue("a"), book.issue("a")
    book.redeem("a", c2)
    for site, c in (("a", c1), ("a", c2), ("b", book.issue("a"))):  # older: retired; used; another site's
        with pytest.raises(HandshakeError, match="challenge"):
            book.redeem(site, c)
    late = book.issue("a")
    now[0] += 121.0
    with pytest.raises(HandshakeError, match="older than 120 s"):
        book.redeem("a", late)
    first = book.issue("a")
    book.issue("a")
    book.issue("a")  # at most two outstanding: the first is dropped
    with pytest.raises(HandshakeError, match="challenge"):
        book.redeem("a", first)


# -- D6: one site cannot hold every worker thread -------------------------------------------------
FLOOD = 40  # above the server's 32 worker threads


def test_one_site_cannot_occupy_every_worker_thread(fed, servers):
    coord = Coordinator(tiny_server("mean"), run_id="run-d6", seed=0, wait_timeout=30)
    server, port = fed.serve(coord)  # the default 32 worker threads
    servers.append(server)
    flooder = fed.transport("a", port)
    try:
        _join(flooder)
        assert flooder._session is not None
        calls = []
        for i in range(FLOOD):  # training forwards for step 5 while the server is at step 0: each would wait
            header = StepHeader("run-d6", "a", 0, 5, i + 1, "train")
            blob = wire.seal_message(flooder._session, "forward", wire.step_to_json(header), [torch.rand(*Z)],
                                     round=0, step=5)
            calls.append(flooder._stub.Forward.future(pb.Sealed(site="a", sealed=blob), timeout=60))
            time.sleep(0.05)  # in order: each frame's sequence number is above the last one opened
        start = time.monotonic()
        with fed.transport("b", port, timeout=10) as other:  # before: queued behind the flood, then timed out
            _join(other)
            assert len(_eval_forward(other, 1)) == 4
        assert time.monotonic() - start < 10
        deadline = time.monotonic() + 20
        while sum(c.done() for c in calls) < FLOOD - DEFAULT_MAX_CALLS_PER_SITE and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [c for c in calls if c.done()]
        assert len(refused) == FLOOD - DEFAULT_MAX_CALLS_PER_SITE  # the others still wait for step 5
        for c in refused:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "calls already in flight" in c.details() and "max_calls_per_site=2" in c.details()
        coord.leave("a")  # the waiting calls end (the site is no longer a member)
        for c in calls:
            if c not in refused:
                assert c.exception(timeout=30) is not None and c.code() == grpc.StatusCode.ABORTED
    finally:
        flooder.close()
    with fed.transport("a", port) as again:  # the finished calls no longer count against the site
        _join(again)
        assert len(_eval_forward(again, 1)) == 4

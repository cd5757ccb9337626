"""TLS failures are named within seconds, not retried for the whole reconnect timeout (issue 14, D10).

Real components: a gRPC server on loopback (``grpc_service.serve``) with certificates from
``provision`` and, for the hostile ones (expired, another CA, another name), from ``cryptography``
signed by the project's own CA key; a ``NetworkedSite`` (what ``fedbone-site train`` runs) with a
reconnect timeout of 120 s, which must stop in under 10 s with the failed check named.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import CLS5, site_cfg, tiny_server
from fedbone_med.cli import site as site_cli
from fedbone_med.crypto.kits import ServerKit, SiteKit
from fedbone_med.crypto.provision import provision
from fedbone_med.server import Coordinator
from fedbone_med.site import networked as site_networked
from fedbone_med.site.networked import NetworkedSite
from fedbone_med.transport.grpc_client import GrpcTransport, RemoteError, TlsError, check_kit_certificate, probe_tls
from fedbone_med.transport.grpc_service import bound_port, serve

RECONNECT = 120.0  # the old behaviour retried TLS failures for this long
FAST = 10.0  # a TLS failure must be named within this many seconds
LOCALHOST_SAN = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls") / "fed"
    provision(root, ["a"])  # server certificate for localhost and 127.0.0.1
    return root


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-other") / "fed"
    provision(root, ["a"])  # another federation: its own CA
    return root


def _issue(ca_root: Path, cn: str, san: list[x509.GeneralName], eku: x509.ObjectIdentifier, *,
           start: timedelta, end: timedelta) -> tuple[bytes, bytes]:
    """A certificate signed by ``ca_root``'s CA key, valid from now + start to now + end; (cert, key) PEM."""
    ca_key = serialization.load_pem_private_key((ca_root / "ca" / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((ca_root / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + end)
        .add_extension(x509.SubjectAlternativeName(san), False)
        .add_extension(x509.ExtendedKeyUsage([eku]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem


def _site_cert(ca_root: Path, *, start: timedelta, end: timedelta) -> tuple[bytes, bytes]:
    return _issue(ca_root, "a", [x509.UniformResourceIdentifier("fedbone://site/a")], ExtendedKeyUsageOID.CLIENT_AUTH,
                  start=start, end=end)


def _serve(fed: Path, servers: list[grpc.Server], *, cert: tuple[bytes, bytes] | None = None,
           client_ca: bytes | None = None, address: str = "127.0.0.1:0") -> str:
    """The federation's server on loopback, optionally with another certificate or trusting another CA."""
    kit = ServerKit.load(fed)
    cert_pem, key_pem = cert or (kit.cert_pem, kit.key_pem)
    coord = Coordinator(tiny_server("mean"), run_id="run-tls", seed=0, wait_timeout=5)
    server = serve(coord, address=address, server_key_pem=key_pem, server_cert_pem=cert_pem,
                   ca_pem=client_ca or kit.ca_pem, registry_dir=fed, identity_key=kit.identity_key,
                   site_keys=kit.site_keys)
    servers.append(server)
    return f"127.0.0.1:{bound_port(server)}"


def _site(kit: SiteKit, tmp_path: Path, address: str, server_name: str = "localhost") -> NetworkedSite:
    cfg = site_cfg("a", "dr_grade", "fundus", CLS5, n_train=4, n_val=4, batch=4)
    return NetworkedSite(cfg, kit, tmp_path / "site", address=address, reconnect_timeout=RECONNECT,
                         progress=False, server_name=server_name)


def _fails_fast(site: NetworkedSite) -> TlsError:
    """Run the site; it must stop with a TlsError within FAST seconds, before the reconnect timeout."""
    t0 = time.monotonic()
    with pytest.raises(TlsError) as info:
        site.run()
    elapsed = time.monotonic() - t0
    assert elapsed < FAST, f"took {elapsed:.1f} s: the TLS failure was retried"
    assert info.value.exit_code == 11 and info.value.code not in site_networked.RETRY_CODES
    return info.value


def _kit(fed: Path) -> SiteKit:
    return SiteKit.load(fed / "sites" / "a")


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


# -- the site's own kit, before any connection ---------------------------------------------------
def test_an_expired_kit_certificate_is_refused_at_start_before_any_connection(fed, tmp_path, monkeypatch):
    cert, key = _site_cert(fed, start=timedelta(days=-30), end=timedelta(days=-2))
    kit = dataclasses.replace(_kit(fed), cert_pem=cert, key_pem=key)
    connects: list[str] = []
    monkeypatch.setattr(site_networked, "GrpcTransport", lambda *a, **kw: connects.append("connect"))
    err = _fails_fast(_site(kit, tmp_path, "127.0.0.1:9"))
    assert err.check == "kit-expired"
    expired = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    assert f"expired on {_day(expired)}" in str(err) and "--renew a" in str(err)
    assert connects == []


def test_fedbone_site_train_refuses_an_expired_kit_with_exit_code_11(fed, tmp_path, capsys):
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    for f in (fed / "sites" / "a").iterdir():
        (kit_dir / f.name).write_bytes(f.read_bytes())
        (kit_dir / f.name).chmod(f.stat().st_mode)
    cert, key = _site_cert(fed, start=timedelta(days=-30), end=timedelta(days=-2))
    (kit_dir / "site.pem").write_bytes(cert)
    (kit_dir / "site-key.pem").write_bytes(key)
    code = site_cli.main(["train", "--config", str(kit_dir / "site.toml"), "--kit", str(kit_dir), "--out",
                          str(tmp_path / "out"), "--server", "127.0.0.1:9", "--reconnect-timeout", "120", "--quiet"])
    err = capsys.readouterr().err
    assert code == 11, err
    assert "kit certificate (site.pem) expired on" in err and "new kit" in err


def test_the_kit_check_names_each_problem_and_warns_before_expiry(fed, other):
    kit = _kit(fed)
    assert check_kit_certificate(kit.ca_pem, kit.cert_pem, kit.key_pem) is None
    soon = _site_cert(fed, start=timedelta(days=-1), end=timedelta(days=5))
    warning = check_kit_certificate(kit.ca_pem, *soon)
    assert warning is not None and "expires on" in warning and "\n" not in warning
    later = _site_cert(fed, start=timedelta(days=2), end=timedelta(days=30))
    with pytest.raises(TlsError, match="not valid yet") as info:
        check_kit_certificate(kit.ca_pem, *later)
    assert info.value.check == "kit-not-yet-valid"
    assert _day(x509.load_pem_x509_certificate(later[0]).not_valid_before_utc) in str(info.value)
    foreign = _kit(other)
    with pytest.raises(TlsError, match="not signed by the kit's CA") as info:
        check_kit_certificate(kit.ca_pem, foreign.cert_pem, foreign.key_pem)
    assert info.value.check == "kit-chain"
    with pytest.raises(TlsError, match="does not belong to its certificate") as info:
        check_kit_certificate(kit.ca_pem, kit.cert_pem, soon[1])
    assert info.value.check == "kit-key"


# -- the server refuses the site's certificate ---------------------------------------------------
def test_a_site_certificate_the_server_refuses_as_expired_is_named_within_seconds(fed, servers):
    """The site's clock is not consulted first here (GrpcTransport alone): the server's refusal is diagnosed."""
    address = _serve(fed, servers)
    kit = _kit(fed)
    cert, key = _site_cert(fed, start=timedelta(days=-30), end=timedelta(days=-2))
    t0 = time.monotonic()
    with pytest.raises(TlsError) as info:
        GrpcTransport("a", address, ca_pem=kit.ca_pem, cert_pem=cert, key_pem=key, identity_key=kit.identity_key,
                      server_public_key=kit.server_identity, timeout=60.0)
    assert time.monotonic() - t0 < FAST
    assert info.value.check == "kit-expired"
    assert "refused this site's certificate" in str(info.value) and "expired on" in str(info.value)


def test_a_site_certificate_from_another_ca_is_named_within_seconds(fed, other, servers, tmp_path):
    address = _serve(fed, servers)
    kit = _kit(fed)
    foreign = _kit(other)
    # the server refuses it (seen through the transport alone) ...
    with pytest.raises(TlsError) as info:
        GrpcTransport("a", address, ca_pem=kit.ca_pem, cert_pem=foreign.cert_pem, key_pem=foreign.key_pem,
                      identity_key=kit.identity_key, server_public_key=kit.server_identity, timeout=60.0)
    assert info.value.check == "kit-chain" and "refused this site's certificate" in str(info.value)
    # ... and the site refuses such a kit at start
    mixed = dataclasses.replace(kit, cert_pem=foreign.cert_pem, key_pem=foreign.key_pem)
    assert _fails_fast(_site(mixed, tmp_path, address)).check == "kit-chain"


def test_a_server_that_trusts_another_ca_for_sites_is_named_within_seconds(fed, other, servers, tmp_path):
    """A consistent, valid kit that the server refuses anyway (it trusts another federation's CA)."""
    address = _serve(fed, servers, client_ca=ServerKit.load(other).ca_pem)
    err = _fails_fast(_site(_kit(fed), tmp_path, address))
    assert err.check == "client-refused" and "refused this site's certificate" in str(err)


# -- the site refuses the server's certificate ---------------------------------------------------
def test_a_server_certificate_for_another_name_is_named_within_seconds(fed, servers, tmp_path):
    address = _serve(fed, servers)  # its certificate is for localhost and 127.0.0.1
    err = _fails_fast(_site(_kit(fed), tmp_path, address, server_name="fedbone.example.org"))
    assert err.check == "server-name"
    assert "not valid for the name 'fedbone.example.org'" in str(err)
    assert "'localhost'" in str(err) and "--server-name localhost" in str(err)


def test_an_expired_server_certificate_is_named_within_seconds(fed, servers, tmp_path):
    cert = _issue(fed, "localhost", LOCALHOST_SAN, ExtendedKeyUsageOID.SERVER_AUTH,
                  start=timedelta(days=-30), end=timedelta(days=-3))
    address = _serve(fed, servers, cert=cert)
    err = _fails_fast(_site(_kit(fed), tmp_path, address))
    assert err.check == "server-expired"
    assert f"expired on {_day(x509.load_pem_x509_certificate(cert[0]).not_valid_after_utc)}" in str(err)


def test_a_server_of_another_federation_is_named_within_seconds(fed, other, servers, tmp_path):
    address = _serve(other, servers)
    err = _fails_fast(_site(_kit(fed), tmp_path, address))
    assert err.check == "server-ca" and "not signed by your kit's CA" in str(err)


def test_a_server_without_tls_is_named_within_seconds(fed, servers, tmp_path):
    kit = ServerKit.load(fed)
    server = serve(Coordinator(tiny_server("mean"), run_id="run-tls", seed=0), address="127.0.0.1:0",
                   server_key_pem=kit.key_pem, server_cert_pem=kit.cert_pem, ca_pem=kit.ca_pem, registry_dir=fed,
                   identity_key=kit.identity_key, site_keys=kit.site_keys, insecure_dev=True)
    servers.append(server)
    err = _fails_fast(_site(_kit(fed), tmp_path, f"127.0.0.1:{bound_port(server)}"))
    assert err.check == "not-tls" and "--insecure-dev" in str(err)


# -- what stays transient ------------------------------------------------------------------------
def test_a_healthy_server_and_a_closed_port_give_the_probe_nothing_to_report(fed, servers):
    address = _serve(fed, servers)
    kit = _kit(fed)
    creds = {"ca_pem": kit.ca_pem, "cert_pem": kit.cert_pem, "key_pem": kit.key_pem, "server_name": "localhost"}
    t0 = time.monotonic()
    assert probe_tls(address, **creds) is None
    assert probe_tls(f"127.0.0.1:{_free_port()}", **creds) is None
    assert time.monotonic() - t0 < FAST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_is_not_listening_yet_is_retried_until_it_listens(fed, servers, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    site = _site(_kit(fed), tmp_path, address)
    starter = threading.Timer(1.5, lambda: _serve(fed, servers, address=address))
    t0 = time.monotonic()
    starter.start()
    try:
        transport = site._connect()
    except RemoteError:
        pytest.fail("the site gave up on a server that started listening after 1.5 s")
    finally:
        starter.join()
    transport.close()
    assert 1.0 < time.monotonic() - t0 < 60.0

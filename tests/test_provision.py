"""Provisioning (CA, server certificate, site startup kits, registry, CRL) and run-time peer verification."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import ssl
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from fedbone_med.cli import server as server_cli
from fedbone_med.config import load_site
from fedbone_med.crypto.errors import SecurityError
from fedbone_med.crypto.identity import (
    IdentityError,
    fingerprint,
    load_ca,
    load_certificate,
    load_crl,
    load_registry,
    verify_peer,
)
from fedbone_med.crypto.kits import ServerKit, SiteKit
from fedbone_med.crypto.provision import ProvisionError, identity_public_hex, provision, revoke, write_private_key
from fedbone_med.errors import ConfigError

SITES = ["clinic-a", "clinic-b", "clinic-c"]
KIT_FILES = {"site-key.pem", "identity-key.pem", "site.pem", "ca.pem", "server-identity.pub.pem",
             "server-address.txt", "site.toml", "README.txt"}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only three-site federation shared by the tests that do not modify it."""
    out = tmp_path_factory.mktemp("fed") / "project"
    provision(out, SITES, server_name="fedbone.example.org")
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _hashes(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _ctx(fed: Path):
    return load_ca(fed), load_crl(fed), load_registry(fed)


def _reason(exc: pytest.ExceptionInfo[IdentityError]) -> str:
    return exc.value.reason


# ----------------------------------------------------------------------------- layout, modes, certificates


def test_provisioning_creates_every_file_with_the_right_modes(fed: Path) -> None:
    assert {p.name for p in (fed / "ca").iterdir()} == {"ca.pem", "ca-key.pem"}
    assert {p.name for p in (fed / "server").iterdir()} == {"server.pem", "server-key.pem", "ca.pem",
                                                           "identity-key.pem", "identity.pub.pem"}
    assert sorted(p.name for p in (fed / "sites").iterdir()) == SITES
    for name in SITES:
        kit = fed / "sites" / name
        assert {p.name for p in kit.iterdir()} == KIT_FILES
        assert _mode(kit / "site-key.pem") == 0o600
        assert _mode(kit / "identity-key.pem") == 0o600
        assert _mode(kit / "site.pem") == 0o644
        assert (kit / "server-identity.pub.pem").read_bytes() == (fed / "server" / "identity.pub.pem").read_bytes()
        assert (kit / "ca.pem").read_bytes() == (fed / "ca" / "ca.pem").read_bytes()
        assert (kit / "server-address.txt").read_text().strip() == "fedbone.example.org:50051"
        readme = (kit / "README.txt").read_text()
        assert "SECRET" in readme and "site-key.pem" in readme and name in readme
        assert not any("ca-key" in p.name for p in kit.iterdir())  # the CA key is never in a kit
    assert _mode(fed / "ca" / "ca-key.pem") == 0o600
    assert _mode(fed / "server" / "server-key.pem") == 0o600
    assert _mode(fed / "server" / "identity-key.pem") == 0o600
    for key in fed.rglob("*-key.pem"):
        if key.name == "identity-key.pem":  # the envelope identity: Ed25519
            assert isinstance(serialization.load_pem_private_key(key.read_bytes(), password=None), Ed25519PrivateKey)
            continue
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp256r1"
    assert (fed / "crl.pem").exists() and (fed / "registry.json").exists()


def test_ca_certificate_is_a_constrained_self_signed_ca(fed: Path) -> None:
    ca = _cert(fed / "ca" / "ca.pem")
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert "fedbone-med" in ca.subject.rfc4514_string()
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3650) <= life <= timedelta(days=3650, minutes=10)


def test_server_and_site_certificates_chain_to_the_ca_with_the_right_sans_and_ekus(fed: Path) -> None:
    ca = _cert(fed / "ca" / "ca.pem")
    srv = _cert(fed / "server" / "server.pem")
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedbone.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    srv_eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(srv_eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    registry = load_registry(fed)
    assert set(registry.sites) == set(SITES)
    for name in SITES:
        cert = _cert(fed / "sites" / name / "site.pem")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"fedbone://site/{name}"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=365) <= life <= timedelta(days=365, minutes=10)
        entry = registry.sites[name]
        assert entry.fingerprint == fingerprint(cert) == hashlib.sha256(cert.public_bytes(
            serialization.Encoding.DER)).hexdigest()
        assert entry.serial == cert.serial_number and entry.not_after == cert.not_valid_after_utc
        assert not entry.revoked
    # pyca's RFC 5280 verifiers accept the server certificate for its DNS name and IP address.
    for host in (x509.DNSName("fedbone.example.org"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(Store([ca])).build_server_verifier(host).verify(srv, [])
    crl = load_crl(fed)
    assert len(list(crl)) == 0 and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_days_sets_the_leaf_validity(tmp_path: Path) -> None:
    provision(tmp_path / "p", ["s1"], days=30)
    cert = _cert(tmp_path / "p" / "sites" / "s1" / "site.pem")
    assert timedelta(days=30) <= cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=30, minutes=10)


def test_site_toml_is_a_valid_site_config_with_the_name_filled_in(fed: Path) -> None:
    path = fed / "sites" / "clinic-b" / "site.toml"
    data = tomllib.loads(path.read_text())
    assert data["name"] == "clinic-b" and "server" not in data
    assert "EDIT" in path.read_text()
    assert load_site(path).name == "clinic-b"


# ----------------------------------------------------------------------------- verify_peer


def test_a_site_certificate_verifies_and_yields_its_name(fed: Path) -> None:
    ca, crl, reg = _ctx(fed)
    for name in SITES:
        pem = (fed / "sites" / name / "site.pem").read_bytes()
        assert verify_peer(pem, ca, crl, reg) == name
        assert verify_peer(load_certificate(pem).public_bytes(serialization.Encoding.DER), ca, crl, reg) == name


def test_a_certificate_from_another_ca_is_refused(fed: Path, tmp_path: Path) -> None:
    provision(tmp_path / "other", ["clinic-a"])
    ca, crl, reg = _ctx(fed)
    with pytest.raises(IdentityError) as exc:
        verify_peer((tmp_path / "other" / "sites" / "clinic-a" / "site.pem").read_bytes(), ca, crl, reg)
    assert _reason(exc) == "chain"
    assert isinstance(exc.value, SecurityError) and exc.value.exit_code == 9


def test_expired_and_not_yet_valid_certificates_are_refused(fed: Path) -> None:
    ca, crl, reg = _ctx(fed)
    pem = (fed / "sites" / "clinic-a" / "site.pem").read_bytes()
    cert = load_certificate(pem)
    assert verify_peer(pem, ca, crl, reg, now=cert.not_valid_after_utc - timedelta(seconds=1)) == "clinic-a"
    with pytest.raises(IdentityError) as exc:
        verify_peer(pem, ca, crl, reg, now=cert.not_valid_after_utc + timedelta(days=1))
    assert _reason(exc) == "expired"
    with pytest.raises(IdentityError) as exc:
        verify_peer(pem, ca, crl, reg, now=cert.not_valid_before_utc - timedelta(days=1))
    assert _reason(exc) in {"not-yet-valid", "ca"}
    with pytest.raises(IdentityError):
        verify_peer(pem, ca, crl, reg, now=datetime(2030, 1, 1))  # naive clock: refused, not guessed


def test_a_server_certificate_presented_as_a_site_is_refused(fed: Path) -> None:
    ca, crl, reg = _ctx(fed)
    with pytest.raises(IdentityError) as exc:
        verify_peer((fed / "server" / "server.pem").read_bytes(), ca, crl, reg)
    assert _reason(exc) == "eku"
    with pytest.raises(IdentityError) as exc:
        verify_peer((fed / "ca" / "ca.pem").read_bytes(), ca, crl, reg)  # the CA itself is no site either
    assert _reason(exc) in {"not-end-entity", "eku"}


def _reissue(fed: Path, name: str, *, eku: bool = True) -> x509.Certificate:
    """A certificate for ``name`` correctly signed by the project CA, but never registered."""
    ca_key = serialization.load_pem_private_key((fed / "ca" / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = _cert(fed / "ca" / "ca.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"fedbone://site/{name}")]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), False)
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return b.sign(ca_key, hashes.SHA256())


def test_a_reissued_certificate_not_in_the_registry_is_refused(fed: Path) -> None:
    ca, crl, reg = _ctx(fed)
    rogue = _reissue(fed, "clinic-a")
    rogue.verify_directly_issued_by(ca)  # a perfectly valid chain, even under RFC 5280 ...
    PolicyBuilder().store(Store([ca])).build_client_verifier().verify(rogue, [])
    with pytest.raises(IdentityError) as exc:
        verify_peer(rogue, ca, crl, reg)
    assert _reason(exc) == "fingerprint"  # ... but not the certificate this site was issued
    with pytest.raises(IdentityError) as exc:
        verify_peer(_reissue(fed, "clinic-zzz"), ca, crl, reg)
    assert _reason(exc) == "unregistered"
    with pytest.raises(IdentityError) as exc:
        verify_peer(_reissue(fed, "clinic-a", eku=False), ca, crl, reg)
    assert _reason(exc) == "eku"


def test_garbage_and_a_crl_from_another_ca_are_refused(fed: Path, tmp_path: Path) -> None:
    ca, crl, reg = _ctx(fed)
    with pytest.raises(IdentityError) as exc:
        verify_peer(b"not a certificate", ca, crl, reg)
    assert _reason(exc) == "parse"
    provision(tmp_path / "other", ["x"])
    with pytest.raises(IdentityError) as exc:
        verify_peer((fed / "sites" / "clinic-a" / "site.pem").read_bytes(), ca, load_crl(tmp_path / "other"), reg)
    assert _reason(exc) == "crl"
    with pytest.raises(IdentityError) as exc:  # a registry that belongs to another CA
        verify_peer((fed / "sites" / "clinic-a" / "site.pem").read_bytes(), ca, crl, load_registry(tmp_path / "other"))
    assert _reason(exc) == "registry"


def test_a_revoked_certificate_is_refused_after_revoke(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, ["s1", "s2"])
    ca, old_crl, old_reg = _ctx(out)
    pem = (out / "sites" / "s1" / "site.pem").read_bytes()
    assert verify_peer(pem, ca, old_crl, old_reg) == "s1"
    serial = revoke(out, "s1", reason="key-compromise")
    assert serial == load_certificate(pem).serial_number
    ca, crl, reg = _ctx(out)
    revoked = crl.get_revoked_certificate_by_serial_number(serial)
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert reg.sites["s1"].revoked and reg.sites["s1"].reason == "key-compromise"
    with pytest.raises(IdentityError) as exc:
        verify_peer(pem, ca, crl, reg)
    assert _reason(exc) == "revoked"
    with pytest.raises(IdentityError) as exc:  # the CRL alone suffices, even with a stale registry
        verify_peer(pem, ca, crl, old_reg)
    assert _reason(exc) == "revoked"
    with pytest.raises(IdentityError) as exc:  # and the registry alone, even with a stale CRL
        verify_peer(pem, ca, old_crl, reg)
    assert _reason(exc) == "revoked"
    assert verify_peer((out / "sites" / "s2" / "site.pem").read_bytes(), ca, crl, reg) == "s2"
    with pytest.raises(ProvisionError):
        revoke(out, "s1")  # already revoked
    with pytest.raises(ProvisionError):
        revoke(out, "nobody")


# ----------------------------------------------------------------------------- adding sites, never overwriting


def test_adding_a_site_later_leaves_existing_files_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, SITES)
    before = _hashes(out)
    reg_before = json.loads((out / "registry.json").read_text())
    res = provision(out, ["clinic-d"])
    after = _hashes(out)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"registry.json", "crl.pem"}  # only the two operator-side indexes are re-written
    assert all(k in after for k in before)
    new = {k for k in after if k not in before}
    assert new == {f"sites/clinic-d/{f}" for f in KIT_FILES}
    assert res.sites == ["clinic-d"] and out / "sites" / "clinic-d" / "site-key.pem" in res.created
    reg_after = json.loads((out / "registry.json").read_text())
    assert set(reg_after["sites"]) == set(SITES) | {"clinic-d"}
    assert all(reg_after["sites"][n] == reg_before["sites"][n] for n in SITES)
    ca, crl, reg = _ctx(out)
    for name in [*SITES, "clinic-d"]:
        assert verify_peer((out / "sites" / name / "site.pem").read_bytes(), ca, crl, reg) == name


def test_existing_sites_and_private_keys_are_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, ["s1"])
    before = _hashes(out)
    with pytest.raises(ProvisionError, match="--renew s1"):
        provision(out, ["s1"])
    with pytest.raises(ProvisionError):
        provision(out, ["s2", "s1"])  # refused as a whole: s2 is not half-created
    assert _hashes(out) == before
    # A kit directory someone created by hand (not in the registry) is not overwritten either.
    (out / "sites" / "s3").mkdir()
    (out / "sites" / "s3" / "site-key.pem").write_bytes(b"precious")
    with pytest.raises(ProvisionError):
        provision(out, ["s3"])
    assert (out / "sites" / "s3" / "site-key.pem").read_bytes() == b"precious"
    # The key writer itself refuses an existing file and leaves it alone.
    target = tmp_path / "key.pem"
    target.write_bytes(b"keep me")
    with pytest.raises(ProvisionError, match="will not be overwritten"):
        write_private_key(target, ec.generate_private_key(ec.SECP256R1()))
    assert target.read_bytes() == b"keep me"
    # A non-empty directory that is not a provisioning directory is refused.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ProvisionError, match="not a provisioning directory"):
        provision(tmp_path / "junk", ["s1"])


def test_renew_issues_a_new_kit_and_revokes_the_old_certificate(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, ["s1", "s2"])
    old_pem = (out / "sites" / "s1" / "site.pem").read_bytes()
    old_key = (out / "sites" / "s1" / "site-key.pem").read_bytes()
    s2_before = _hashes(out / "sites" / "s2")
    res = provision(out, [], renew=["s1"])
    assert res.sites == ["s1"]
    retired = [p for p in (out / "sites" / ".retired").iterdir()]
    assert len(retired) == 1 and (retired[0] / "site-key.pem").read_bytes() == old_key  # moved, not destroyed
    ca, crl, reg = _ctx(out)
    new_pem = (out / "sites" / "s1" / "site.pem").read_bytes()
    assert new_pem != old_pem and verify_peer(new_pem, ca, crl, reg) == "s1"
    with pytest.raises(IdentityError) as exc:
        verify_peer(old_pem, ca, crl, reg)
    assert _reason(exc) == "revoked"
    assert _hashes(out / "sites" / "s2") == s2_before
    with pytest.raises(ProvisionError):
        provision(out, [], renew=["unknown"])


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    for bad in (["../evil"], [".hidden"], ["a b"], ["dup", "dup"], []):
        with pytest.raises(ConfigError):
            provision(tmp_path / "p", bad)
    with pytest.raises(ConfigError):
        provision(tmp_path / "p", ["ok"], days=0)
    with pytest.raises(ConfigError):
        provision(tmp_path / "p", ["ok"], server_address="no-port")
    with pytest.raises(ConfigError):
        revoke(tmp_path / "p", "ok", reason="because")
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- command line


def test_cli_provision_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kits"
    assert server_cli.main(["provision", "--sites", "east,west", "--out", str(out), "--server-address",
                            "fl.example.org:8443", "--days", "90"]) == 0
    printed = capsys.readouterr().out
    for f in ("ca/ca-key.pem", "server/server.pem", "sites/east/site-key.pem", "sites/west/site.toml",
              "registry.json", "crl.pem"):
        assert f in printed
        assert (out / f).exists()
    assert "SECRET" in printed
    assert (out / "sites" / "west" / "server-address.txt").read_text().strip() == "fl.example.org:8443"
    assert server_cli.main(["provision", "--sites", "east", "--out", str(out)]) == 9
    assert "already provisioned" in capsys.readouterr().err
    assert server_cli.main(["provision", "--sites", "bad/name", "--out", str(out)]) == 2
    assert server_cli.main(["revoke", "--out", str(out), "--site", "west", "--reason", "cessation-of-operation"]) == 0
    assert "revoked site 'west'" in capsys.readouterr().out
    assert load_registry(out).sites["west"].revoked


# ----------------------------------------------------------------------------- TLS stacks accept the PEMs


def test_grpc_accepts_the_generated_pems(fed: Path) -> None:
    grpc = pytest.importorskip("grpc")
    kit, srv = fed / "sites" / "clinic-a", fed / "server"
    server_creds = grpc.ssl_server_credentials(
        [((srv / "server-key.pem").read_bytes(), (srv / "server.pem").read_bytes())],
        root_certificates=(srv / "ca.pem").read_bytes(), require_client_auth=True,
    )
    channel_creds = grpc.ssl_channel_credentials(
        root_certificates=(kit / "ca.pem").read_bytes(), private_key=(kit / "site-key.pem").read_bytes(),
        certificate_chain=(kit / "site.pem").read_bytes(),
    )
    assert server_creds is not None and channel_creds is not None


def test_mutual_tls_handshake_in_memory_then_verify_peer(fed: Path) -> None:
    """A real mTLS handshake (OpenSSL via ``ssl``, in memory, no sockets) with the kit's files."""
    kit, srv = fed / "sites" / "clinic-b", fed / "server"
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(srv / "server.pem", srv / "server-key.pem")
    sctx.load_verify_locations(srv / "ca.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(kit / "ca.pem")
    cctx.load_cert_chain(kit / "site.pem", kit / "site-key.pem")
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(c_in, c_out, server_hostname="fedbone.example.org")
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", client), ("s", server)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = server.getpeercert(binary_form=True)
    assert peer is not None
    assert verify_peer(peer, *_ctx(fed)) == "clinic-b"


def test_kits_load_and_pair_the_envelope_identities(fed: Path) -> None:
    """The registry carries each site's identity public key; each kit carries the server's."""
    server = ServerKit.load(fed)
    assert sorted(server.site_keys) == SITES
    for name in SITES:
        kit = SiteKit.load(fed / "sites" / name)
        assert identity_public_hex(kit.identity_key) == identity_public_hex(server.site_keys[name])
        assert identity_public_hex(kit.server_identity) == identity_public_hex(server.identity_key)
        assert kit.address == "fedbone.example.org:50051"
    other = SiteKit.load(fed / "sites" / SITES[0])
    assert identity_public_hex(other.identity_key) != identity_public_hex(server.site_keys[SITES[1]])


def test_kit_loader_refuses_a_group_readable_secret_and_a_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, ["a"])
    kit = out / "sites" / "a"
    (kit / "identity-key.pem").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        SiteKit.load(kit)
    (kit / "identity-key.pem").chmod(0o600)
    (kit / "server-identity.pub.pem").unlink()
    with pytest.raises(ConfigError, match="server-identity.pub.pem: missing"):
        SiteKit.load(kit)


def test_a_revoked_site_has_no_envelope_identity_at_the_server(tmp_path: Path) -> None:
    out = tmp_path / "p"
    provision(out, ["a", "b"])
    revoke(out, "a")
    assert sorted(ServerKit.load(out).site_keys) == ["b"]

"""Malformed kit keys are kit errors (issue 14, D11); activation and frame limits follow the cut (D12)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import tiny_server
from fedbone_med.config import ServerConfig, experiment_from_mapping
from fedbone_med.crypto import _primitives as prim
from fedbone_med.crypto.errors import InvalidMessage
from fedbone_med.crypto.handshake import ClientHandshake, NonceCache, ServerHandshake
from fedbone_med.crypto.kits import KitError, ServerKit, SiteKit
from fedbone_med.crypto.provision import provision
from fedbone_med.errors import ConfigError, FedboneError, ProtocolError
from fedbone_med.models.split import CutSpec
from fedbone_med.server.coordinator import Coordinator
from fedbone_med.transport import JoinRequest, StepHeader, wire
from fedbone_med.transport.validate import check_activation

# -- D11: kit keys ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "fed"
    provision(out, ["a"], server_address="fedbone.example.org:50051")
    return out


@pytest.fixture
def work(fed: Path, tmp_path: Path) -> Path:
    """A fresh copy of the provisioning directory, to damage."""
    dest = tmp_path / "fed"
    shutil.copytree(fed, dest)
    return dest


def _pkcs8(key, password: bytes | None = None) -> bytes:
    enc = serialization.NoEncryption() if password is None else serialization.BestAvailableEncryption(password)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


RSA = rsa.generate_private_key(65537, 2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = Ed25519PrivateKey.generate()
GARBAGE_PEM = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n"

# (what the file holds, words the message must contain besides the file name and the expected type)
PRIVATE_VARIANTS = {
    "encrypted": (_pkcs8(ED, b"secret"), "encrypted"),
    "rsa": (_pkcs8(RSA), "RSA"),
    "ec": (_pkcs8(EC), "EC (secp256r1)"),
    "garbage-pem": (GARBAGE_PEM, "not a readable PEM private key"),
    "not-pem": (b"\x00\x01 this is no key", "not a readable PEM private key"),
    "empty": (b"", "not a readable PEM private key"),
    "public-key": (_public(ED), "not a readable PEM private key"),
}
PUBLIC_VARIANTS = {
    "rsa": (_public(RSA), "RSA"),
    "ec": (_public(EC), "EC (secp256r1)"),
    "garbage-pem": (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a readable PEM public key"),
    "private-key": (_pkcs8(ED), "not a readable PEM public key"),
}


def _damage(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    path.chmod(0o600)


def _load(work: Path, rel: str):
    return ServerKit.load(work) if rel.startswith("server/") else SiteKit.load(work / "sites" / "a")


@pytest.mark.parametrize("rel", ["server/identity-key.pem", "sites/a/identity-key.pem"])
@pytest.mark.parametrize("variant", sorted(PRIVATE_VARIANTS))
def test_a_malformed_identity_key_is_a_kit_error_naming_file_and_type(work: Path, rel: str, variant: str) -> None:
    content, words = PRIVATE_VARIANTS[variant]
    _damage(work / rel, content)
    with pytest.raises(KitError) as info:
        _load(work, rel)
    msg = str(info.value)
    assert str(work / rel) in msg and "Ed25519 private key" in msg and words in msg, msg
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2


@pytest.mark.parametrize("variant", sorted(PUBLIC_VARIANTS))
def test_a_malformed_server_identity_public_key_is_a_kit_error(work: Path, variant: str) -> None:
    content, words = PUBLIC_VARIANTS[variant]
    rel = "sites/a/server-identity.pub.pem"
    (work / rel).write_bytes(content)
    with pytest.raises(KitError) as info:
        SiteKit.load(work / "sites" / "a")
    msg = str(info.value)
    assert str(work / rel) in msg and "Ed25519 public key" in msg and words in msg, msg


@pytest.mark.parametrize("rel", ["server/server-key.pem", "sites/a/site-key.pem"])
@pytest.mark.parametrize("variant", ["encrypted", "rsa", "garbage-pem", "not-pem", "ed25519"])
def test_a_malformed_tls_key_is_a_kit_error(work: Path, rel: str, variant: str) -> None:
    content, words = {"encrypted": (_pkcs8(EC, b"pw"), "encrypted"), "rsa": (_pkcs8(RSA), "RSA"),
                      "ed25519": (_pkcs8(ED), "Ed25519"), "garbage-pem": PRIVATE_VARIANTS["garbage-pem"],
                      "not-pem": PRIVATE_VARIANTS["not-pem"]}[variant]
    _damage(work / rel, content)
    with pytest.raises(KitError) as info:
        _load(work, rel)
    msg = str(info.value)
    assert str(work / rel) in msg and "ECDSA (P-256) private key" in msg and words in msg, msg


@pytest.mark.parametrize("rel", ["server/server.pem", "server/ca.pem", "sites/a/site.pem", "sites/a/ca.pem"])
def test_a_malformed_certificate_is_a_kit_error(work: Path, rel: str) -> None:
    (work / rel).write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(KitError, match="PEM X.509 certificate") as info:
        _load(work, rel)
    assert str(work / rel) in str(info.value)


def test_a_server_tls_key_of_another_certificate_is_a_kit_error(work: Path) -> None:
    _damage(work / "server" / "server-key.pem", _pkcs8(EC))
    with pytest.raises(KitError, match="does not belong to the certificate"):
        ServerKit.load(work)


def test_intact_kits_still_load(work: Path) -> None:
    server, site = ServerKit.load(work), SiteKit.load(work / "sites" / "a")
    assert sorted(server.site_keys) == ["a"] and site.address == "fedbone.example.org:50051"
    assert server.key_pem == (work / "server" / "server-key.pem").read_bytes()


def test_a_deeply_nested_registry_is_an_identity_error(work: Path) -> None:
    (work / "registry.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FedboneError, match="not valid JSON"):
        ServerKit.load(work)


# -- D12: activation and frame limits from the cut --------------------------------------------


def _coordinator(*, max_batch: int, max_z_side: int) -> Coordinator:
    cfg = dataclasses.replace(tiny_server("mean"), max_batch=max_batch, max_z_side=max_z_side)
    c = Coordinator(cfg, run_id="r", seed=0, wait_timeout=5)
    c.join(JoinRequest("a", "fundus", "classification", 8, "test"))
    return c


def test_the_cut_carries_max_batch_and_max_z_side_from_the_server_config() -> None:
    c = _coordinator(max_batch=6, max_z_side=24)
    assert (c.cut.max_batch, c.cut.max_side) == (6, 24)
    assert ServerConfig().max_z_side == 256 and ServerConfig().max_batch == 4096
    assert "max_z_side: must be > 0" in "".join(ServerConfig(max_z_side=0).validate())
    assert "at most" in "".join(ServerConfig(max_z_side=1 << 20).validate())


def test_a_z_at_the_bound_passes_and_one_beyond_is_refused_before_the_backbone_runs(monkeypatch) -> None:
    c = _coordinator(max_batch=4, max_z_side=16)
    calls: list[tuple[int, ...]] = []
    real = c.backbone.forward

    def spy(z: torch.Tensor) -> list[torch.Tensor]:
        calls.append(tuple(z.shape))
        return real(z)

    monkeypatch.setattr(c.backbone, "forward", spy)
    C = c.cut.z_channels
    c.forward(StepHeader("r", "a", 0, 0, 1, "eval"), torch.zeros(4, C, 16, 16))
    assert calls == [(4, C, 16, 16)]
    for seq, (shape, key) in enumerate([((5, C, 16, 16), "server.max_batch"), ((4, C, 17, 16), "server.max_z_side"),
                                        ((4, C, 16, 17), "server.max_z_side"), ((1, C, 1, 4096), "server.max_z_side")],
                                       start=2):
        with pytest.raises(ProtocolError) as info:
            c.forward(StepHeader("r", "a", 0, 0, seq, "eval"), torch.zeros(shape))
        msg = str(info.value)
        assert key in msg and ("1..4" in msg or "1..16" in msg), msg
    assert len(calls) == 1  # the backbone never saw the refused activations


def test_check_activation_bounds_come_from_the_cut() -> None:
    cut = CutSpec(8, (16,), (2,), max_batch=3, max_side=10)
    check_activation(torch.zeros(3, 8, 10, 10), cut, "a")
    with pytest.raises(ProtocolError, match=r"batch size 4 is outside 1\.\.3 .*server\.max_batch"):
        check_activation(torch.zeros(4, 8, 10, 10), cut, "a")
    with pytest.raises(ProtocolError, match=r"spatial size 11x10 is outside 1\.\.10 .*server\.max_z_side"):
        check_activation(torch.zeros(3, 8, 11, 10), cut, "a")


def test_frame_limits_are_derived_from_max_batch_and_max_z_side() -> None:
    base = CutSpec(16, (32, 64), (2, 4), max_batch=4, max_side=32)
    lim = wire.request_frame_limits(base, 1 << 30)
    z_bytes = 4 * 16 * 32 * 32 * 4
    assert base.max_z_bytes() == z_bytes
    assert base.max_feature_bytes() == 4 * (32 * 16 * 16 + 64 * 8 * 8) * 4
    assert lim["forward"] == wire.FRAME_OVERHEAD + 2 * wire.STEP_META_BYTES + z_bytes
    double = wire.request_frame_limits(dataclasses.replace(base, max_batch=8), 1 << 30)
    assert double["forward"] - lim["forward"] == z_bytes  # linear in max_batch
    assert double["backward"] - lim["backward"] == base.max_feature_bytes()
    wider = wire.request_frame_limits(dataclasses.replace(base, max_side=64), 1 << 30)
    assert wider["forward"] - lim["forward"] == 3 * z_bytes  # quadratic in max_z_side
    capped = wire.request_frame_limits(dataclasses.replace(base, max_batch=4096), 1 << 20)
    assert capped["forward"] == wire.FRAME_OVERHEAD + (1 << 20)  # network.max_frame_mb still caps
    assert lim["join"] == lim["leave"] == lim["round-sync"] == wire.FRAME_OVERHEAD + 2 * wire.MAX_META_BYTES


def _pair() -> tuple:
    site_key, server_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    client = ClientHandshake(site_key, server_key.public_key(), "r", "a")
    hello, server = ServerHandshake(server_key, site_key.public_key(), "r", "a",
                                    replay_cache=NonceCache()).respond(client.hello())
    return client.finish(hello), server


def test_a_frame_larger_than_the_largest_valid_z_is_refused_before_decryption(monkeypatch) -> None:
    cut = CutSpec(16, (32, 64), (2, 4), max_batch=4, max_side=32)
    limits = wire.request_frame_limits(cut, 1 << 30)
    site, server = _pair()
    step = wire.step_to_json(StepHeader("r", "a", 0, 0, 1))
    ok = wire.seal_message(site, "forward", step, [torch.zeros(4, 16, 32, 32)])
    assert len(ok) <= limits["forward"]
    _, _, tensors = wire.open_message(server, ok, "forward", max_bytes=limits["forward"])
    check_activation(tensors[0], cut, "a")
    decrypted: list[int] = []
    real = prim.aead_decrypt

    def spy(*args: object) -> bytes:
        decrypted.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(prim, "aead_decrypt", spy)
    # One more sample than max_batch, a z far beyond max_z_side, or a z at the bound sent as float64
    for z in (torch.zeros(5, 16, 32, 32), torch.zeros(4, 16, 64, 64), torch.zeros(4, 16, 32, 32).double()):
        big = wire.seal_message(site, "forward", step, [z])
        with pytest.raises(InvalidMessage, match="too-large") as info:
            wire.open_message(server, big, "forward", max_bytes=limits["forward"])
        assert "server.max_batch" in str(info.value) and "server.max_z_side" in str(info.value)
    assert not decrypted
    # Within the frame's fixed overhead (header and meta allowance) a z just beyond the bound still opens:
    # the activation check refuses it, before the backbone runs
    _, _, tensors = wire.open_message(server, wire.seal_message(site, "forward", step, [torch.zeros(4, 16, 32, 33)]),
                                      "forward", max_bytes=limits["forward"])
    with pytest.raises(ProtocolError, match="server.max_z_side"):
        check_activation(tensors[0], cut, "a")
    # A control message cannot smuggle a z-sized payload either
    with pytest.raises(InvalidMessage, match="too-large"):
        wire.open_message(server, wire.seal_message(site, "leave", None, [torch.zeros(1 << 20)]), "leave",
                          max_bytes=limits["leave"])


def test_an_experiment_whose_site_z_exceeds_max_z_side_is_a_config_error(tmp_path: Path) -> None:
    site = tmp_path / "s.toml"
    site.write_text('name = "s"\nmodality = "fundus"\n[data]\nimage_size = 512\n[task]\ntype = "classification"\n'
                    'num_classes = 5\n[model]\nstride = 2\n')
    data = {"name": "e", "sites": [{"config": str(site)}], "server": {"max_z_side": 128}}
    with pytest.raises(ConfigError, match=r"z at the cut is 256 x 256 .*server\.max_z_side = 128"):
        experiment_from_mapping(data, tmp_path)
    data["server"] = {"max_z_side": 256}
    assert experiment_from_mapping(data, tmp_path).server.max_z_side == 256


def test_every_shipped_configuration_fits_the_default_limits() -> None:
    from fedbone_med.config import load_experiment

    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "pipelines").rglob("*.toml")):
        text = path.read_text()
        if "[[sites]]" not in text:
            continue
        cfg = load_experiment(path)  # validates: raises a ConfigError if a site's z exceeds the bound
        assert cfg.server.max_z_side == 256

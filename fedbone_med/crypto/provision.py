"""Provisioning: a project CA, a server certificate and one startup kit per site.

Modelled on NVIDIA FLARE's startup kits. ``provision(out, sites)`` creates, in ``out``::

    ca/ca.pem, ca/ca-key.pem            the project CA (the key stays with the operator, never in a kit)
    server/server.pem, server-key.pem   the server's TLS certificate (serverAuth) and key, plus ca.pem
    server/identity-key.pem, identity.pub.pem   the server's Ed25519 envelope identity (handshake signing key)
    sites/NAME/                         the startup kit handed to site NAME's administrator:
        site.pem, site-key.pem, ca.pem, identity-key.pem, server-identity.pub.pem,
        server-address.txt, site.toml, README.txt
    registry.json                       site name -> certificate fingerprint, serial, not_after, revoked,
                                        and the site's Ed25519 identity public key

Two identities per party, on purpose. The TLS certificate authenticates the connection; the Ed25519
identity key signs the envelope handshake (:mod:`.handshake`), which keeps activations sealed end to
end even where a hospital network terminates TLS at an inspecting proxy. The server learns each
site's identity public key from ``registry.json``; each kit carries the server's.
    crl.pem                             certificate revocation list signed by the CA (initially empty)

Keys are ECDSA P-256 and certificates are signed with ECDSA-SHA256. That is the one choice every
TLS stack gRPC may sit on accepts for mutual TLS (BoringSSL in gRPC core, OpenSSL, Java, Go);
Ed25519 certificates work only with TLS 1.3 and are refused by several of them. P-256 keys are
also quick to generate.

Private keys are created with ``os.open(..., O_CREAT | O_EXCL, 0o600)`` and are never
overwritten; no existing file is ever rewritten except ``registry.json`` and ``crl.pem``, which
are replaced atomically. Provisioning again on an existing directory reuses the CA and the server
certificate and adds only the new sites' kits; re-issuing a site's kit needs ``renew`` (the old
kit is moved to ``sites/.retired/`` and its certificate revoked as superseded).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError, FedboneError
from .identity import (
    SITE_URI_PREFIX,
    IdentityError,
    Registry,
    RegistryEntry,
    fingerprint,
    load_registry,
)

KIT_FILES = ("site-key.pem", "identity-key.pem", "site.pem", "ca.pem", "server-identity.pub.pem",
             "server-address.txt", "site.toml", "README.txt")
DEFAULT_LEAF_DAYS = 365
DEFAULT_CA_DAYS = 3650
DEFAULT_PORT = 50051
DEFAULT_PROJECT = "fedbone-med"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


class ProvisionError(FedboneError):
    """Provisioning cannot proceed without destroying or contradicting existing material."""

    exit_code = 9


@dataclass
class ProvisionResult:
    """What :func:`provision` did: the paths it created (absolute) and any notes for the operator."""

    out: Path
    created: list[Path] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- file writing


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; refuse (never truncate) if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ProvisionError(
            f"{path} already exists and will not be overwritten; move it away (or choose another --out) first"
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)  # the umask may have narrowed or (for 0o644) kept the mode; make it exact
    except BaseException:
        os.unlink(path)
        raise


def write_private_key(path: str | Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key (gRPC reads it as is) with mode 0600; never overwrite."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_new(Path(path), pem, 0o600)


def write_identity_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write an Ed25519 envelope identity key (PKCS#8 PEM, mode 0600); never overwrite."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_new(Path(path), pem, 0o600)


def identity_public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _identity_public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_public(path: Path, data: bytes | str) -> None:
    _write_new(path, data.encode("utf-8") if isinstance(data, str) else data, 0o644)


def _replace_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(project: str, cn: str, unit: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _make_ca(project: str, days: int, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name(project, f"{project} federation CA", "federation")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, subject: x509.Name,
    san: list[x509.GeneralName], eku: list[x509.ObjectIdentifier], days: int, now: datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)  # never outlive the CA
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _crl(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, revoked: Iterable[x509.RevokedCertificate],
    number: int, now: datetime, days: int,
) -> x509.CertificateRevocationList:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for r in revoked:
        b = b.add_revoked_certificate(r)
    return b.sign(ca_key, hashes.SHA256())


def _revoked_entry(serial: int, reason: str, now: datetime) -> x509.RevokedCertificate:
    b = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
    if reason != "unspecified":
        b = b.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
    return b.build()


# ----------------------------------------------------------------------------- kit contents


def site_toml(name: str) -> str:
    """The site configuration template placed in a startup kit (data only; parses as a site config)."""
    return f'''# Site configuration for "{name}", generated by `fedbone-server provision`.
# This file is data only (TOML); `fedbone-site` reads it. Edit it before the first run:
#  - modality: "fundus" or "oct", whatever your images are;
#  - [data]: source = "manifest" plus manifest = "PATH" (a CSV describing your images and labels,
#    relative to this file) for real data; "phantom" generates synthetic images for a dry run;
#  - [task]: what your site learns (classification or segmentation, number of classes);
#  - [model] and [train]: usually left as they are, unless the federation operator says otherwise.
# Do not change `name`: it must match the name in your certificate (site.pem) or the server refuses you.
# The server's address is in server-address.txt, not here. Examples: the project's sites/*.toml.
name = "{name}"
modality = "fundus"  # EDIT: "fundus" or "oct"

[data]
source = "phantom"  # EDIT: "manifest" for real data, and add: manifest = "my-manifest.csv"
task = "vessels"    # EDIT: the task your data carries
image_size = 64
n_train = 256
n_val = 64

[task]
type = "segmentation"  # EDIT: "classification" or "segmentation"
mode = "binary"
num_classes = 1

[model]
embedding = "conv-stem"
stride = 2
head = "segmentation"  # EDIT: must match [task] type

[train]
batch_size = 16
lr = 1e-3
'''


def site_readme(name: str, project: str, server_address: str, not_after: datetime) -> str:
    return f"""Startup kit for site "{name}" of federation "{project}"
=========================================================

Generated by `fedbone-server provision`. Keep this directory on the site's training machine only.

  site-key.pem        SECRET. This site's private key (mode 0600). Never send it anywhere, never
                      copy it into tickets, e-mail or version control. If it may have leaked, ask
                      the federation operator to revoke this kit (`fedbone-server revoke`).
  identity-key.pem    SECRET. This site's Ed25519 envelope identity key (mode 0600): it signs the
                      key agreement that seals every activation end to end. Same care as site-key.pem.
  server-identity.pub.pem  The server's envelope identity public key (public).
  site.pem            This site's certificate (public). Common name and URI SAN name the site
                      ({SITE_URI_PREFIX}{name}); usable for TLS client authentication only.
                      Expires {not_after.isoformat()}; ask the operator for a renewed kit before then.
  ca.pem              The federation's CA certificate (public). Used to check the server's identity.
  server-address.txt  Where the server listens (host:port): {server_address}
  site.toml           Site configuration template (data only). Edit the lines marked EDIT.
  README.txt          This file.

Only site-key.pem and identity-key.pem are secret. The CA's private key is not in this kit: it stays with the operator.
"""


# ----------------------------------------------------------------------------- provisioning


def _check_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if not SITE_NAME.match(n):
            raise ConfigError(
                f"--sites: {n!r} is not a valid site name (1-63 letters, digits, '.', '_', '-'; starting with a "
                "letter or digit)"
            )
        if n in out:
            raise ConfigError(f"--sites: {n!r} is listed twice")
        out.append(n)
    return out


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ProvisionError(
            f"{path}: the CA private key is needed to sign new certificates; put it back (it is kept offline "
            "by the operator) and run again"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise ProvisionError(f"{path}: cannot load the CA private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{path}: the CA key is not an ECDSA key")
    return key


def _mkdir(path: Path, mode: int, created: list[Path]) -> None:
    if not path.exists():
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        created.append(path)


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc).replace(microsecond=0)
    if now.tzinfo is None:
        raise ConfigError("now: a timezone-aware datetime is required")
    return now.astimezone(timezone.utc)


def _validate_days(days: int, what: str) -> None:
    if not isinstance(days, int) or days < 1 or days > 36500:
        raise ConfigError(f"{what}: expected a whole number of days between 1 and 36500, got {days!r}")


def _parse_address(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--server-address: expected HOST:PORT (e.g. localhost:{DEFAULT_PORT}), got {addr!r}")
    return addr


def provision(
    out: str | Path,
    sites: Sequence[str],
    *,
    server_name: str | None = None,
    server_address: str | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    project: str = DEFAULT_PROJECT,
    renew: Sequence[str] = (),
    now: datetime | None = None,
) -> ProvisionResult:
    """Create (or extend) a provisioning directory; see the module docstring for its layout.

    On a new directory: makes the CA, the server certificate (SAN DNS:``server_name``, default
    ``localhost``, and IP 127.0.0.1), the CRL, the registry, and one kit per site. On an existing one:
    reuses the CA and server certificate and adds kits for new sites only; a site that already has a
    kit is refused unless it is listed in ``renew``. ``now`` (UTC) is the issuing clock, for tests.
    """
    _validate_days(days, "--days")
    _validate_days(ca_days, "--ca-days")
    names = _check_names(list(sites) + [r for r in renew if r not in sites])
    renew_set = set(_check_names(renew))
    if not names:
        raise ConfigError("--sites: name at least one site")
    if server_address is not None:
        _parse_address(server_address)
    clock = _utc_now(now)
    root = Path(out).resolve()
    res = ProvisionResult(out=root)
    ca_dir, server_dir, sites_dir = root / "ca", root / "server", root / "sites"
    reg_path, crl_path = root / "registry.json", root / "crl.pem"

    existing = (ca_dir / "ca.pem").exists()
    if root.exists() and not root.is_dir():
        raise ProvisionError(f"--out {root}: exists and is not a directory")
    if root.exists() and not existing and any(root.iterdir()):
        raise ProvisionError(f"--out {root}: not empty and not a provisioning directory (no ca/ca.pem); choose another")
    if existing and not (reg_path.exists() and crl_path.exists()):
        raise ProvisionError(
            f"{root}: has a CA but no registry.json or crl.pem (an interrupted first run?); "
            "if no kit from it was handed out, delete the directory and provision again"
        )

    registry: Registry | None = load_registry(root) if existing else None
    # Check every name before writing anything.
    for n in names:
        kit = sites_dir / n
        known = registry is not None and n in registry.sites
        if n in renew_set:
            if not known:
                raise ProvisionError(f"--renew {n}: no such site in {reg_path}; provision it with --sites instead")
        elif known or kit.exists():
            raise ProvisionError(
                f"site {n!r} is already provisioned in {root} ({kit}); its kit and key are left untouched. "
                f"Use --renew {n} to issue a new kit (the old one is revoked), or choose a new name"
            )
    if not existing and renew_set:
        raise ProvisionError(f"--renew: {root} has not been provisioned yet")

    if not root.exists():
        root.mkdir(parents=True, mode=0o755)
        res.created.append(root)
    if not existing:
        _mkdir(ca_dir, 0o700, res.created)
        ca_key, ca_cert = _make_ca(project, ca_days, clock)
        write_private_key(ca_dir / "ca-key.pem", ca_key)
        _write_public(ca_dir / "ca.pem", _pem(ca_cert))
        res.created += [ca_dir / "ca-key.pem", ca_dir / "ca.pem"]
        host = server_name or "localhost"
        registry = Registry(
            project=project,
            server_address=server_address or f"{host}:{DEFAULT_PORT}",
            ca_fingerprint=fingerprint(ca_cert),
        )
        crl_number, revoked_list = 1, []
    else:
        ca_key = _load_key(ca_dir / "ca-key.pem")
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        assert registry is not None
        if registry.ca_fingerprint and registry.ca_fingerprint != fingerprint(ca_cert):
            raise ProvisionError(f"{reg_path}: was written for a different CA than {ca_dir / 'ca.pem'}")
        if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise ProvisionError(f"{ca_dir / 'ca-key.pem'}: does not belong to {ca_dir / 'ca.pem'}")
        if clock >= ca_cert.not_valid_after_utc:
            raise ProvisionError(f"{ca_dir / 'ca.pem'}: the CA has expired; provision a new federation")
        old_crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        number_ext = old_crl.extensions.get_extension_for_class(x509.CRLNumber).value
        crl_number, revoked_list = number_ext.crl_number + 1, list(old_crl)
        if server_name is not None:
            res.notes.append("--server-name ignored: the server certificate already exists (server/server.pem)")
        if server_address is not None and server_address != registry.server_address:
            res.notes.append(
                f"new kits use server address {server_address}; earlier kits still say {registry.server_address}"
            )

    address = server_address or registry.server_address
    if not (server_dir / "server.pem").exists():
        host = server_name or "localhost"
        _mkdir(server_dir, 0o700, res.created)
        san: list[x509.GeneralName] = [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        try:
            ip = ipaddress.ip_address(host)
            san = [x509.IPAddress(ip)] + ([] if str(ip) == "127.0.0.1" else san[1:])
        except ValueError:
            pass
        key, cert = _issue(ca_key, ca_cert, _name(registry.project, host, "server"), san,
                           [ExtendedKeyUsageOID.SERVER_AUTH], days, clock)
        write_private_key(server_dir / "server-key.pem", key)
        _write_public(server_dir / "server.pem", _pem(cert))
        _write_public(server_dir / "ca.pem", _pem(ca_cert))
        res.created += [server_dir / "server-key.pem", server_dir / "server.pem", server_dir / "ca.pem"]

    if not (server_dir / "identity-key.pem").exists():  # also added to directories provisioned before it existed
        server_identity = Ed25519PrivateKey.generate()
        write_identity_key(server_dir / "identity-key.pem", server_identity)
        _write_public(server_dir / "identity.pub.pem", _identity_public_pem(server_identity))
        res.created += [server_dir / "identity-key.pem", server_dir / "identity.pub.pem"]
    server_identity_pub = (server_dir / "identity.pub.pem").read_bytes()

    _mkdir(sites_dir, 0o755, res.created)
    for n in names:
        kit = sites_dir / n
        # Build the kit in a private temporary directory, then move it into place in one step.
        tmp = Path(tempfile.mkdtemp(dir=sites_dir, prefix=f".{n}.partial-"))
        try:
            key, cert = _issue(
                ca_key, ca_cert, _name(registry.project, n, "site"),
                [x509.UniformResourceIdentifier(f"{SITE_URI_PREFIX}{n}")],
                [ExtendedKeyUsageOID.CLIENT_AUTH], days, clock,
            )
            write_private_key(tmp / "site-key.pem", key)
            identity = Ed25519PrivateKey.generate()
            write_identity_key(tmp / "identity-key.pem", identity)
            _write_public(tmp / "server-identity.pub.pem", server_identity_pub)
            _write_public(tmp / "site.pem", _pem(cert))
            _write_public(tmp / "ca.pem", _pem(ca_cert))
            _write_public(tmp / "server-address.txt", address + "\n")
            _write_public(tmp / "site.toml", site_toml(n))
            _write_public(tmp / "README.txt", site_readme(n, registry.project, address, cert.not_valid_after_utc))
            os.chmod(tmp, 0o700)
            if n in renew_set:
                old = registry.sites[n]
                if not old.revoked:
                    revoked_list.append(_revoked_entry(old.serial, "superseded", clock))
                if kit.exists():
                    retired = sites_dir / ".retired"
                    _mkdir(retired, 0o700, res.created)
                    target = retired / f"{n}-{old.serial:x}"
                    if target.exists():
                        raise ProvisionError(f"{target} already exists; move it away and run --renew {n} again")
                    kit.rename(target)
                    res.notes.append(f"old kit of {n!r} moved to {target} and its certificate revoked (superseded)")
            if kit.exists():
                raise ProvisionError(f"{kit} appeared while provisioning; not overwriting it")
            tmp.rename(kit)
        except BaseException:
            for f in tmp.iterdir() if tmp.exists() else ():
                f.unlink()
            if tmp.exists():
                tmp.rmdir()
            raise
        res.created += [kit] + [kit / f for f in KIT_FILES]
        registry.sites[n] = RegistryEntry(
            name=n, fingerprint=fingerprint(cert), serial=cert.serial_number, not_after=cert.not_valid_after_utc,
            identity_key=identity_public_hex(identity),
        )
        res.sites.append(n)

    crl = _crl(ca_key, ca_cert, revoked_list, crl_number, clock, days)
    for path, data in ((crl_path, crl.public_bytes(serialization.Encoding.PEM)),
                       (reg_path, (json.dumps(registry.to_json(), indent=2) + "\n").encode())):
        if not path.exists():
            res.created.append(path)
        _replace_atomically(path, data)
    return res


def revoke(out: str | Path, site: str, *, reason: str = "unspecified", now: datetime | None = None) -> int:
    """Revoke ``site``'s certificate: add its serial to the CRL (re-signed) and mark it in the registry.

    Returns the revoked serial. The site's kit is left in place (it is useless without a valid certificate).
    """
    if reason not in REASONS:
        raise ConfigError(f"--reason: expected one of {', '.join(REASONS)}, got {reason!r}")
    clock = _utc_now(now)
    root = Path(out).resolve()
    if not (root / "ca" / "ca.pem").exists():
        raise ProvisionError(f"--out {root}: not a provisioning directory (no ca/ca.pem)")
    try:
        registry = load_registry(root)
    except IdentityError as exc:
        raise ProvisionError(str(exc)) from None
    entry = registry.sites.get(site)
    if entry is None:
        raise ProvisionError(f"site {site!r} is not in {root / 'registry.json'}; known: {', '.join(registry.sites)}")
    if entry.revoked:
        raise ProvisionError(f"site {site!r} is already revoked (serial {entry.serial:x})")
    ca_key = _load_key(root / "ca" / "ca-key.pem")
    ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.pem").read_bytes())
    old = x509.load_pem_x509_crl((root / "crl.pem").read_bytes())
    number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    revoked = list(old)
    if old.get_revoked_certificate_by_serial_number(entry.serial) is None:
        revoked.append(_revoked_entry(entry.serial, reason, clock))
    crl = _crl(ca_key, ca_cert, revoked, number, clock, DEFAULT_LEAF_DAYS)
    registry.sites[site] = RegistryEntry(
        name=site, fingerprint=entry.fingerprint, serial=entry.serial, not_after=entry.not_after,
        revoked=True, revoked_at=clock.isoformat(), reason=reason, identity_key=entry.identity_key,
    )
    _replace_atomically(root / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
    _replace_atomically(root / "registry.json", (json.dumps(registry.to_json(), indent=2) + "\n").encode())
    return entry.serial

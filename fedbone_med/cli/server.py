"""``fedbone-server``: provision a federation and serve the shared backbone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .common import main_wrapper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-server", description="Serve the FedBone backbone to hospital sites.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    s = sub.add_parser("serve", help="serve the backbone over gRPC with mutual TLS")
    s.add_argument("--config", required=True,
                   help="server TOML (schedule, [server], [network], sites = [...]) or an experiment TOML")
    s.add_argument("--kit", required=True, help="the provisioning directory (server/, registry.json, crl.pem)")
    s.add_argument("--out", required=True, help="output directory: checkpoints/, server-results.json, audit/")
    s.add_argument("--address", help="HOST:PORT to listen on (default: [network] address; port 0 picks one)")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument("--port-file", help="write the bound port to this file once listening")
    s.add_argument("--threads", type=int, help="torch CPU threads for the backbone (default: torch's choice)")
    s.add_argument("--progress", choices=["bar", "lines", "none"], default="bar",
                   help="a progress bar (default), 'progress STEP TOTAL' lines for a launcher, or nothing")
    s.add_argument("--insecure-dev", action="store_true",
                   help="development only: serve without TLS (refused on any non-loopback address); every frame is "
                        "still sealed and every site still authenticated by its identity key")
    s.add_argument("--rotate-audit-key", metavar="PEM",
                   help="switch the audit log to this new signing key (from `fedbone-audit keygen`) at launch; "
                        "the switch is recorded and signed by the old key")
    s.set_defaults(func=_serve)
    pr = sub.add_parser("provision", help="create a project CA, server certificate and site startup kits")
    pr.add_argument("--sites", default="", help="comma-separated site names, e.g. eye-clinic-a,eye-clinic-b")
    pr.add_argument("--out", required=True, help="provisioning directory (created, or extended if it exists)")
    pr.add_argument("--server-name", default=None, help="DNS name in the server certificate (default: localhost)")
    pr.add_argument("--server-address", default=None, help="HOST:PORT written into the kits (default: NAME:50051)")
    pr.add_argument("--days", type=int, default=365, help="validity of server and site certificates (default 365)")
    pr.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA certificate (default 3650)")
    pr.add_argument("--project", default="fedbone-med", help="project name in the CA subject (new directory only)")
    pr.add_argument("--renew", default="", help="comma-separated sites to re-issue; their old certificates are revoked")
    pr.set_defaults(func=_provision)
    rv = sub.add_parser("revoke", help="revoke a site's certificate (adds it to crl.pem, marks registry.json)")
    rv.add_argument("--out", required=True, help="the provisioning directory")
    rv.add_argument("--site", required=True)
    rv.add_argument("--reason", default="unspecified",
                    choices=["unspecified", "key-compromise", "affiliation-changed", "superseded",
                             "cessation-of-operation"])
    rv.set_defaults(func=_revoke)
    return p


def _serve(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_serve_config
    from ..server.networked import NetworkedServer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_serve_config(args.config)
    server = NetworkedServer(cfg, args.kit, args.out, address=args.address, resume=args.resume,
                             port_file=args.port_file, progress=args.progress, insecure_dev=args.insecure_dev,
                             rotate_audit_key=args.rotate_audit_key)
    server.run()
    print(f"server results: {server.out / 'server-results.json'}    checkpoint: {server.ckpt_path}")
    return 0


def _split(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


def _provision(args: argparse.Namespace) -> int:
    from ..crypto.provision import provision

    res = provision(
        args.out, _split(args.sites), server_name=args.server_name, server_address=args.server_address,
        days=args.days, ca_days=args.ca_days, project=args.project, renew=_split(args.renew),
    )
    print(f"provisioned {len(res.sites)} site(s) in {res.out}: {', '.join(res.sites)}")
    for path in res.created:
        rel = path.relative_to(res.out) if path != res.out else path
        secret = "  (SECRET, mode 0600)" if path.name.endswith("-key.pem") else ""
        print(f"  created {rel}{'/' if path.is_dir() else ''}{secret}")
    for note in res.notes:
        print(f"  note: {note}")
    print("Keep ca/ca-key.pem with the federation operator (offline if possible); it is in no kit.")
    print("Give server/ to the server host and each sites/NAME/ to that site's administrator over a secure channel.")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from ..crypto.provision import revoke

    serial = revoke(args.out, args.site, reason=args.reason)
    print(f"revoked site {args.site!r} (certificate serial {serial:x}); crl.pem and registry.json updated.")
    print("Restart or reload the server so that it reads the new crl.pem and registry.json.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

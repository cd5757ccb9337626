"""``fedbone-server``: provision a federation and serve the shared backbone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .common import main_wrapper, not_yet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-server", description="Serve the FedBone backbone to hospital sites.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    s = sub.add_parser("serve", help="serve the backbone over gRPC with mutual TLS")
    s.add_argument("--config", required=True)
    s.set_defaults(func=not_yet("fedbone-server serve", "the networked federation issue"))
    pr = sub.add_parser("provision", help="create a project CA, server certificate and site startup kits")
    pr.add_argument("--sites", required=True)
    pr.add_argument("--out", required=True)
    pr.set_defaults(func=not_yet("fedbone-server provision", "the networked federation issue"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)

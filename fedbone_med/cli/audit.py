"""``fedbone-audit``: what a compliance auditor runs against a training audit log."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .common import main_wrapper, not_yet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-audit", description="Verify and report FedBone training audit logs.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    for name, text in (
        ("verify", "verify a log's hash chain and signatures"),
        ("cross-check", "cross-check a site's log against the server's"),
        ("report", "summarise a log for a compliance report"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("log")
        c.set_defaults(func=not_yet(f"fedbone-audit {name}", "the audit log issue"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)

"""``fedbone-audit``: what a compliance auditor runs against a training audit log.

``keygen`` creates the server's signing key (0600) and the public key auditors get;
``verify`` checks the hash chain and checkpoint signatures (exit 0, or exit 8 with
``error: ...`` naming the line and the failed check); ``report`` verifies and then writes a
Markdown summary. ``cross-check`` needs site-side logs from the networked federation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..audit.errors import AuditError
from .common import main_wrapper, not_yet

if TYPE_CHECKING:
    from ..audit.verify import VerifyReport


def _verify(args: argparse.Namespace) -> VerifyReport:
    from ..audit.keys import load_public_keys
    from ..audit.verify import verify_log

    return verify_log(args.log, load_public_keys(args.public_key), require_complete=not args.allow_unsigned_tail)


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..audit.keys import keygen

    priv, pub, kid = keygen(args.out)
    print(f"signing key (keep secret, mode 0600): {priv}")
    print(f"public key (give to auditors): {pub}")
    print(f"key_id: {kid}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = _verify(args)
    print(f"OK: {report.summary()}")
    if report.unsigned_tail:
        print(f"warning: unsigned tail: {report.unsigned_tail} records are not covered by a signed checkpoint",
              file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..audit.report import render_report

    text = render_report(_verify(args)) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise AuditError(f"cannot write report {args.out}: {exc.strerror}") from None
        print(f"report written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _log_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("log", help="audit log (JSON Lines)")
    c.add_argument("--public-key", action="append", required=True, metavar="PEM",
                   help="server public key PEM; repeat for every key used after key rotation")
    c.add_argument("--allow-unsigned-tail", action="store_true",
                   help="accept records after the last signed checkpoint (interrupted or running log)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-audit", description="Verify and report FedBone training audit logs.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    c = sub.add_parser("keygen", help="create the server's audit signing key and public key")
    c.add_argument("--out", required=True, metavar="DIR", help="directory for the key files (created)")
    c.set_defaults(func=cmd_keygen)
    c = sub.add_parser("verify", help="verify a log's hash chain and signatures")
    _log_args(c)
    c.set_defaults(func=cmd_verify)
    c = sub.add_parser("report", help="verify a log, then summarise it in Markdown for a compliance report")
    _log_args(c)
    c.add_argument("--out", metavar="FILE", help="write the report here instead of standard output")
    c.set_defaults(func=cmd_report)
    c = sub.add_parser("cross-check", help="cross-check a site's log against the server's")
    c.add_argument("log")
    c.set_defaults(func=not_yet("fedbone-audit cross-check", "site-side audit logs of the networked federation"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)

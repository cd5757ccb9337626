"""``fedbone-audit``: what a compliance auditor runs against a training audit log.

``keygen`` creates a signing key (0600) and the public key auditors get;
``verify`` checks the hash chain and checkpoint signatures (exit 0, or exit 8 with
``error: ...`` naming the line and the failed check); ``report`` verifies and then writes a
Markdown summary, or with ``--out FILE.html`` one self-contained HTML page (written for a
failing log too, showing the failure; exit 8 then); ``export`` verifies and writes one CSV
row per record; ``cross-check`` verifies a server log and a site log and compares, round by
round, what each side says was exchanged (exit 0 when they agree, exit 8 naming the first round and field that differ;
a round interrupted by a server restart is listed with the frames only the site booked, which are not compared);
``prove`` writes an RFC 6962 inclusion proof for one record or a consistency proof between
two signed checkpoints, and ``check-proof`` checks one with nothing but the public key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..audit.errors import AuditError
from .common import main_wrapper

if TYPE_CHECKING:
    from ..audit.verify import VerifyReport


def _verify(args: argparse.Namespace) -> VerifyReport:
    from ..audit.keys import load_public_keys
    from ..audit.verify import verify_log

    return verify_log(args.log, load_public_keys(args.public_key), require_complete=not args.allow_unsigned_tail,
                      require_ended=getattr(args, "require_ended", False))


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
    for run in report.open_runs:
        print(f"note: run {run} has no run_end record: it is still running, was interrupted before its last "
              "round, or the log was cut at a signed checkpoint (--require-ended makes this an error)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown (stdout, or ``--out`` not ending in .html/.htm) or one self-contained HTML page.

    Markdown refuses a log that fails verification (nothing is written). HTML writes the page
    anyway -- the failure first, then only the verified prefix -- and still exits 8.
    """
    if args.out and Path(args.out).suffix.lower() in (".html", ".htm"):
        return _report_html(args)
    from ..audit.report import render_report

    text = render_report(_verify(args)) + "\n"
    if args.out:
        _write_text(args.out, text, "report")
        print(f"report written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _write_text(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise AuditError(f"cannot write {what} {path}: {exc.strerror}") from None


def _report_html(args: argparse.Namespace) -> int:
    from ..audit.html import html_report
    from ..audit.keys import load_public_keys

    page, error = html_report(args.log, load_public_keys(args.public_key),
                              require_complete=not args.allow_unsigned_tail)
    _write_text(args.out, page, "report")
    if error is not None:
        print(f"report written to {args.out} (it shows the verification FAILURE)")
        raise AuditError(f"{error} (see the report {args.out})", check=error.check, line=error.line)
    print(f"report written to {args.out} (verification OK)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..audit.export import to_csv

    report = _verify(args)
    text = to_csv(report)
    try:
        with open(args.csv, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise AuditError(f"cannot write CSV {args.csv}: {exc.strerror}") from None
    print(f"{report.count} records written to {args.csv} (verified: {report.summary()})")
    return 0


def cmd_cross_check(args: argparse.Namespace) -> int:
    from ..audit.crosscheck import cross_check
    from ..audit.keys import load_public_keys

    server_keys = load_public_keys(args.server_key) if args.server_key else None
    site_keys = load_public_keys(args.site_key) if args.site_key else None
    report = cross_check(args.server_log, args.site_log, server_keys=server_keys, site_keys=site_keys,
                         require_complete=not args.allow_unsigned_tail, allow_backfilled=args.allow_backfilled)
    print(f"server log {args.server_log}: {report.server.summary()}")
    print(f"site log {args.site_log} (site {report.site_id}): {report.site.summary()}")
    for name, keys in (("server", server_keys), ("site", site_keys)):
        if keys is None:
            print(f"warning: {name} log signatures NOT checked (pass --{name}-key PEM)", file=sys.stderr)
    for check in report.rounds:
        print(check.line())
    first = report.first_difference
    if first is not None:
        n = len(report.differences)
        raise AuditError(f"cross-check failed: {first.describe()}" + (f" (and {n - 1} more difference(s))"
                                                                     if n > 1 else ""), check="cross-check")
    print(f"OK: server and site {report.site_id} agree on {report.scope()}")
    if report.interrupted:
        print(f"note: {len(report.interrupted)} attempt(s) interrupted by a server restart: the frames exchanged in "
              "them are booked by the site only (the server lost its ledgers), so they are not compared",
              file=sys.stderr)
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    import json

    from ..audit.proofs import consistency_bundle, inclusion_bundle

    report = _verify(args)
    if args.record is not None:
        bundle = inclusion_bundle(report, args.record, args.checkpoint)
    else:
        bundle = consistency_bundle(report, args.consistency, args.checkpoint)
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise AuditError(f"cannot write proof {args.out}: {exc.strerror}") from None
        print(f"{bundle['type']} proof written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_check_proof(args: argparse.Namespace) -> int:
    import json

    from ..audit.keys import load_public_keys
    from ..audit.proofs import check_bundle

    try:
        bundle = json.loads(Path(args.proof).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuditError(f"cannot read proof {args.proof}: {exc.strerror}", check="proof") from None
    except (ValueError, RecursionError):
        raise AuditError(f"{args.proof} is not JSON", check="proof") from None
    if not isinstance(bundle, dict):
        raise AuditError(f"{args.proof} is not a proof bundle", check="proof")
    print(check_bundle(bundle, load_public_keys(args.public_key)))
    return 0


def _log_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("log", help="audit log (JSON Lines)")
    c.add_argument("--public-key", action="append", required=True, metavar="PEM",
                   help="public key PEM of the log's signer; repeat for every key used after key rotation")
    _tail_arg(c)


def _tail_arg(c: argparse.ArgumentParser) -> None:
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
    c.add_argument("--require-ended", action="store_true",
                   help="fail unless every run in the log is closed by its run_end record (for finished runs: a log "
                        "cut at a signed checkpoint otherwise verifies as a shorter run)")
    c.set_defaults(func=cmd_verify)
    c = sub.add_parser("report", help="verify a log, then summarise it in Markdown or one HTML page for an auditor")
    _log_args(c)
    c.add_argument("--out", metavar="FILE",
                   help="write the report here instead of standard output; a name ending in .html or .htm gives one "
                        "self-contained HTML page (written even when verification fails, showing the failure; "
                        "exit 8 then), any other name Markdown")
    c.set_defaults(func=cmd_report)
    c = sub.add_parser("export", help="verify a log, then write one CSV row per record")
    _log_args(c)
    c.add_argument("--csv", required=True, metavar="FILE", help="CSV file to write")
    c.set_defaults(func=cmd_export)
    c = sub.add_parser("cross-check", help="verify a server log and a site log and show they agree round by round")
    c.add_argument("server_log", metavar="SERVER_LOG", help="the server's audit log")
    c.add_argument("site_log", metavar="SITE_LOG", help="one site's own audit log")
    c.add_argument("--server-key", action="append", metavar="PEM",
                   help="server public key PEM (repeat after key rotation); without it signatures are not checked")
    c.add_argument("--site-key", action="append", metavar="PEM",
                   help="site public key PEM (repeat after key rotation); without it signatures are not checked")
    _tail_arg(c)
    c.add_argument("--allow-backfilled", action="store_true",
                   help="do not fail on rounds back-filled after a crash (they cannot be compared)")
    c.set_defaults(func=cmd_cross_check)
    c = sub.add_parser("prove", help="verify a log, then write a Merkle inclusion or consistency proof (JSON)")
    _log_args(c)
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=int, metavar="LINE", help="prove that this line (1-based) is in the log")
    what.add_argument("--consistency", type=int, metavar="CHECKPOINT_LINE",
                      help="prove that the log extends the one signed at this checkpoint line")
    c.add_argument("--checkpoint", type=int, metavar="LINE",
                   help="the signed checkpoint to prove against (default: the first covering the record, or the last)")
    c.add_argument("--out", metavar="FILE", help="write the proof here instead of standard output")
    c.set_defaults(func=cmd_prove)
    c = sub.add_parser("check-proof", help="check a proof from `prove` with the signer's public key only")
    c.add_argument("proof", metavar="PROOF", help="proof bundle (JSON)")
    c.add_argument("--public-key", action="append", required=True, metavar="PEM",
                   help="public key PEM of the log's signer; repeat after key rotation")
    c.set_defaults(func=cmd_check_proof)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

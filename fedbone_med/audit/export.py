"""Export a *verified* audit log as CSV: one row per record, fields flattened.

Protects auditors' spreadsheets from two things: unverified input (the export takes the
:class:`~.verify.VerifyReport` that only a successful verification returns) and formula
injection (a text cell starting with ``= + - @``, tab or carriage return gets a leading
``'``; numbers are written as numbers). The CSV holds exactly what the log holds --
identifiers, counts, hashes, statistics -- and never patient data.

Columns: ``line, seq, time, kind, run_id, round, site_id``, then every other body field
flattened with dots, sorted by name: nested objects become ``a.b``, per-site lists of
objects become ``sites.<site_id>.<field>`` (e.g. ``sites.site-01.ledger.up.frames``), lists
of plain values are joined with ``;``. A field a record does not have is an empty cell;
``null`` is the text ``null``. The envelope's ``prev`` hash is omitted (verification
already covered it).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from .verify import VerifyReport

FIXED = ("line", "seq", "time", "kind", "run_id", "round", "site_id")
_RISKY = ("=", "+", "-", "@", "\t", "\r")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "site_id" in v for v in value):
        for v in value:
            _flatten({k: x for k, x in v.items() if k != "site_id"}, f"{prefix}.{v['site_id']}", out)
    elif isinstance(value, list):
        out[prefix] = ";".join("null" if v is None else str(v) for v in value)
    else:
        out[prefix] = value


def flatten_record(env: dict[str, Any]) -> dict[str, Any]:
    """One CSV row (unescaped) for a parsed log envelope."""
    row: dict[str, Any] = {"line": env["seq"] + 1, "seq": env["seq"], "time": env["time"], "kind": env["kind"]}
    _flatten(env["body"], "", row)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return "'" + text if text.startswith(_RISKY) else text


def to_csv(report: VerifyReport) -> str:
    """The CSV text (RFC 4180, ``\\r\\n`` line ends) of a verified log."""
    rows = [flatten_record(env) for env in report.records]
    extra = sorted({k for r in rows for k in r} - set(FIXED))
    columns = list(FIXED) + extra
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if c not in r else _cell(r[c]) for c in columns])
    return buf.getvalue()

"""Self-contained HTML audit report: one page an auditor can open, print or archive.

Protects the auditor against two things: a page that depends on something outside it (the
page has no scripts, no external style sheets, fonts or images: CSS is inline, plots are SVG
generated here, and a Content-Security-Policy forbids loading anything), and a page that
shows unverified content as if it were sound.

* A log that **verifies** (:func:`render_html` with the :class:`~.verify.VerifyReport` that only
  a successful :func:`~.verify.verify_log` returns): verification result and summary, per-round
  table, participants, ε per site over rounds, conflict statistics over rounds, events (skipped
  steps, back-filled rounds, key rotations, revocations, configuration changes, checkpoint
  writes) and the signed checkpoints with their Merkle roots. Records after the last signed
  checkpoint (``--allow-unsigned-tail``) are flagged UNSIGNED wherever they appear.
* A log that **fails** (:func:`render_failure_html`): the failure (line, check, message) is the
  first thing on the page, and no record after the failure is shown. Only the *verified
  prefix* is shown -- lines 1..c where line c is the last signed checkpoint before the failing
  line, re-verified on its own by :func:`~.verify.verify_log` -- inside a frame labelled
  "verified prefix only"; if there is none, no record content is shown at all.

Everything taken from the log is HTML-escaped (site ids, reasons, key ids, ...). Training
losses are plotted per site over rounds from the optional ``train_loss`` of each site entry of
the server's round records (self-reported by the sites, see ``audit/GUIDE.md``); a log whose
round records carry none (older logs, or a server that did not pass ``losses=``) gets a note
saying so instead of a plot.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .. import __version__
from .errors import AuditError
from .records import LOG_CHECKPOINT
from .verify import VerifyReport, verify_log

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")

CHECK_MEANING = {
    "empty": "the log has no records",
    "torn-line": "the last line is incomplete (crash mid-write, or the file was cut mid-line)",
    "canonical-json": "a line is not the canonical JSON of its content: it was edited or re-formatted",
    "envelope": "a line is not a valid audit record (unknown kind, unknown or mistyped field)",
    "sequence": "a record's sequence number is not its position: a record was deleted, duplicated or reordered",
    "hash-chain": "a record's prev hash does not match the line before: that line, or this one, was altered",
    "checkpoint": "a signed checkpoint's count or head does not match the records before it",
    "signature": "a checkpoint's signature is invalid or made by a key that was not given",
    "merkle": "a checkpoint's signed Merkle root is not the tree hash of the lines before it",
    "rounds": "a round is missing or recorded twice within a run",
    "backbone": "a round, resume or run end does not continue from the backbone the previous record ended with",
    "checkpoint-hash": "a resume or run end names another checkpoint file than the one the last round recorded",
    "run-end": "a run's closing record does not match its rounds, is repeated, or rounds follow it",
    "unsigned-tail": "records follow the last signed checkpoint (truncated log or interrupted run)",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;margin:0 auto;
max-width:1400px;padding:16px 24px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 14px;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
tbody.round{border-top:2px solid #888}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.banner{padding:12px 16px;border-radius:6px;margin:12px 0;font-size:15px}
.ok{background:#e6f4ea;border:2px solid #1e8e3e}.fail{background:#fce8e6;border:3px solid #c5221f}
.warn{background:#fef7e0;border:2px solid #f9ab00}
.verdict{font-size:20px;font-weight:700}.ok .verdict{color:#137333}.fail .verdict{color:#a50e0e}
.flag{display:inline-block;font-size:11px;font-weight:700;padding:0 4px;border-radius:3px;margin:1px 2px 1px 0}
.flag.unsigned{background:#f9ab00;color:#000}.flag.backfill{background:#a142f4;color:#fff}
.flag.skip{background:#5f6368;color:#fff}
.prefix{border:3px dashed #c5221f;padding:4px 16px;margin-top:16px}
.prefix>.label{color:#a50e0e;font-weight:700}
.legend span.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
.muted{color:#5f6368}nav a{margin-right:12px}
figure{margin:8px 0 18px}figcaption{font-size:12px;color:#5f6368}
@media print{.banner,.flag,.legend span.sw{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def esc(value: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe in attributes)."""
    return escape("null" if value is None else str(value), quote=True)


def _num(value: float | int | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _short(h: str | None, n: int = 16) -> str:
    return "—" if not h else f'<code title="{esc(h)}">{esc(h[:n])}…</code>'


def _full(h: str | None) -> str:
    return "—" if not h else f"<code>{esc(h)}</code>"


def _parse_time(t: str) -> datetime:
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in t else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.strptime(t, fmt).replace(tzinfo=timezone.utc)


def _duration(start: str, end: str) -> str:
    try:
        return f"{(_parse_time(end) - _parse_time(start)).total_seconds():.1f} s"
    except ValueError:
        return "—"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = (),
           empty: str = "None recorded.") -> list[str]:
    """A table from already-escaped cells; ``numeric`` column indexes are right-aligned."""
    num = set(numeric)
    body = ["<tr>" + "".join(f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
            + "</tr>" for r in rows]
    if not body:
        return [f'<p class="muted">{esc(empty)}</p>']
    return (["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
            + body + ["</tbody></table>"])


# ---------------------------------------------------------------- SVG plots

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out, t = [], first
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    return out


def _fmt_tick(v: float) -> str:
    return f"{v:.6g}"


def svg_chart(series: Sequence[tuple[str, Sequence[tuple[float, float | None]]]], *, title: str, x_label: str,
              y_label: str, bars: bool = False, y_zero: bool = True, width: int = 760, height: int = 250) -> str:
    """An inline SVG chart (lines, or grouped bars) with an HTML legend; ``None`` y values leave gaps.

    ``series`` is ``[(label, [(x, y), ...]), ...]``; labels are escaped.
    """
    pts = [(x, y) for _, s in series for x, y in s if y is not None]
    if not pts:
        return f'<p class="muted">{esc(title)}: no values recorded.</p>'
    ml, mr, mt, mb = 62, 14, 10, 38
    pw, ph = width - ml - mr, height - mt - mb
    xs = [x for _, s in series for x, _ in s]
    x0, x1 = min(xs), max(xs)
    if bars:
        x0, x1 = x0 - 0.5, x1 + 0.5
    elif x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    ys = [y for _, y in pts]
    y0, y1 = (min(0.0, min(ys)) if y_zero else min(ys)), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = (y1 - y0) * 0.05
    y1 += pad
    if not (y_zero and y0 == 0):
        y0 -= pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + (y1 - y) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for t in _ticks(y0, y1):
        ty = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{ml - 5}" y="{ty + 4:.1f}" font-size="11" text-anchor="end">{_fmt_tick(t)}</text>')
    xt = [t for t in _ticks(x0, x1, 8) if float(t).is_integer()] or [x0]
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{mt + ph + 16}" font-size="11" text-anchor="middle">{_fmt_tick(t)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 4}" font-size="12" text-anchor="middle">{esc(x_label)}</text>'
               f'<text x="14" y="{mt + ph / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {mt + ph / 2})">{esc(y_label)}</text>')
    if y0 < 0 < y1:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#666"/>')
    n = max(len(series), 1)
    for k, (_, s) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        if bars:
            bw = pw / (x1 - x0) * 0.8 / n
            for x, y in s:
                if y is None:
                    continue
                left = sx(x) - 0.4 * pw / (x1 - x0) + k * bw
                top, bottom = sy(max(y, 0.0)), sy(min(y, 0.0))
                out.append(f'<rect x="{left:.2f}" y="{top:.2f}" width="{max(bw, 0.5):.2f}" '
                           f'height="{max(bottom - top, 0.5):.2f}" fill="{color}"/>')
            continue
        segments: list[list[str]] = [[]]
        for x, y in s:
            if y is None:
                segments.append([])
            else:
                segments[-1].append(f"{sx(x):.1f},{sy(y):.1f}")
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{" ".join(seg)}"/>')
        if len(s) <= 60:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.8" fill="{color}"/>'
                    for x, y in s if y is not None]
    out.append("</svg>")
    legend = "".join(f'<span class="sw" style="background:{PALETTE[k % len(PALETTE)]}"></span>{esc(label)}'
                     for k, (label, _) in enumerate(series))
    return (f"<figure>{''.join(out)}<figcaption class=\"legend\">{esc(title)}: {legend}</figcaption></figure>")


# ---------------------------------------------------------------- verified report

class _Ctx:
    """Per-report lookups: which lines are unsigned, and the line number of each record."""

    def __init__(self, report: VerifyReport) -> None:
        self.first_unsigned = report.count - report.unsigned_tail

    def flags(self, env: Mapping[str, Any]) -> str:
        out = []
        if env["seq"] >= self.first_unsigned:
            out.append('<span class="flag unsigned" title="after the last signed checkpoint">UNSIGNED</span>')
        if env["kind"].endswith("_backfill"):
            out.append('<span class="flag backfill" title="recovered after a crash; per-site data lost">'
                       "BACK-FILLED</span>")
        return "".join(out)


def _verdict_ok(report: VerifyReport) -> list[str]:
    out = ['<section id="verification" class="banner ok" data-verification="ok">',
           '<div class="verdict">Verification: OK</div>',
           f"<div>{esc(report.summary())}</div>",
           f"<div>Signing key id(s): {esc(', '.join(report.key_ids) or 'none')}; "
           f"head (SHA-256 of the last line): <code>{esc(report.head)}</code></div>"]
    if report.records:
        out.append(f"<div>First record {esc(report.records[0]['time'])}; last record "
                   f"{esc(report.records[-1]['time'])}</div>")
    out.append("</section>")
    if report.unsigned_tail:
        out.append(f'<section class="banner warn"><b>Warning: unsigned tail.</b> The last {report.unsigned_tail} '
                   "record(s) follow the last signed checkpoint (truncated log, or an interrupted or still-running "
                   "run). They are <b>not covered by a signature</b> and are flagged "
                   '<span class="flag unsigned">UNSIGNED</span> wherever they appear below.</section>')
    if not report.signatures_checked:
        out.append('<section class="banner warn"><b>Warning: signatures were NOT checked</b> (no public key given): '
                   "the hash chain is intact, but anyone could have rewritten the whole log.</section>")
    return out


def _body_sections(report: VerifyReport) -> list[str]:
    ctx = _Ctx(report)
    recs = report.records
    out = ['<nav><a href="#runs">Runs and rounds</a><a href="#participants">Participants</a>'
           '<a href="#events">Events</a><a href="#checkpoints">Signed checkpoints</a></nav>', '<h2 id="runs">Runs</h2>']
    for run in report.runs:
        out += _run_section(run, [e for e in recs if e["body"]["run_id"] == run], ctx)
    out += _participants(recs, ctx)
    out += _events(recs, ctx)
    out += _checkpoints(recs, ctx)
    return out


def _run_section(run: str, recs: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    out = [f"<h2>Run <code>{esc(run)}</code></h2>"]
    for e in recs:
        if e["kind"] == "run_start":
            b = e["body"]
            out.append(f"<p>Started {esc(e['time'])} (line {e['seq'] + 1}){ctx.flags(e)}; software "
                       f"{esc(b['software_version'])}; aggregation <b>{esc(b['aggregation_method'])}</b>; seed "
                       f"{esc(b['seed'])}<br>Config hash {_full(b['config_hash'])}<br>Initial backbone "
                       f"{_full(b['backbone_hash'])}<br>Planned sites: {esc(', '.join(b['sites']))}</p>")
        if e["kind"] == "site_run_start":
            b = e["body"]
            out.append(f"<p>Site <b>{esc(b['site_id'])}</b> launched {esc(e['time'])} at round {b['round']} "
                       f"(line {e['seq'] + 1}){ctx.flags(e)}; software {esc(b['software_version'])}; config hash "
                       f"{_short(b['config_hash'])}; certificate {esc(b['cert_fingerprint'])}; server certificate "
                       f"{esc(b['server_fingerprint'])}</p>")
    server_rounds = [e for e in recs if e["kind"] in ("round", "round_backfill")]
    site_rounds = [e for e in recs if e["kind"] in ("site_round", "site_round_backfill")]
    if server_rounds:
        out += _server_rounds(server_rounds, ctx)
    if site_rounds:
        out += _site_rounds(site_rounds, ctx)
    if not server_rounds and not site_rounds:
        out.append('<p class="muted">No round records in this run.</p>')
    out += _plots(run, [e for e in server_rounds if e["kind"] == "round"], site_rounds)
    return out


def _server_rounds(rounds: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    out = ["<h3>Rounds (server record)</h3>",
           '<p class="muted">One block per round. ε and δ are the cumulative privacy spent as reported by each '
           "site; the norm is the site's mean gradient norm in the round. Hashes are abbreviated (full values in "
           "the next table).</p>",
           "<table><thead><tr><th>round</th><th>line</th><th>time window (UTC)</th><th>aggregation</th>"
           "<th>conflicting pairs</th><th>min cos</th><th>mean cos</th><th>backbone before → after</th>"
           "<th>checkpoint</th><th>site</th><th>cert fingerprint</th><th>steps</th><th>samples</th><th>ε</th>"
           "<th>δ</th><th>mean norm</th><th>frames up/down</th><th>train loss</th></tr></thead>"]
    for e in rounds:
        b = e["body"]
        line = f"{e['seq'] + 1}"
        if e["kind"] == "round_backfill":
            out.append(f'<tbody class="round"><tr><td class="n">{b["round"]}{ctx.flags(e)}</td><td class="n">{line}'
                       f'</td><td colspan="6">recovered after a crash: {esc(b["reason"])}; step {esc(b["step"])}; '
                       f"log's last round before {esc(b['log_last_round'])}; backbone {_short(b['backbone_hash'])}"
                       f'</td><td>{_short(b["checkpoint_hash"])}</td><td colspan="9" class="muted">no per-site data '
                       "(lost in the crash)</td></tr></tbody>")
            continue
        agg = b["aggregation"]
        sites = b["sites"] or [None]
        span = f' rowspan="{len(sites)}"' if len(sites) > 1 else ""
        head = (f'<td class="n"{span}>{b["round"]}{ctx.flags(e)}</td><td class="n"{span}>{line}</td>'
                f"<td{span}>{esc(b['started_at'])}<br>→ {esc(b['ended_at'])}<br>"
                f'<span class="muted">{_duration(b["started_at"], b["ended_at"])}</span></td>'
                f"<td{span}>{esc(agg['method'])} ({agg['steps']} steps)</td>"
                f'<td class="n"{span}>{agg["conflicting_pairs_total"]}</td>'
                f'<td class="n"{span}>{_num(agg["min_cosine"])}</td><td class="n"{span}>{_num(agg["mean_cosine"])}</td>'
                f"<td{span}>{_short(b['backbone_hash_before'], 12)}<br>→ {_short(b['backbone_hash_after'], 12)}</td>"
                f"<td{span}>{_short(b['checkpoint_hash'], 12)}</td>")
        rows = []
        for s in sites:
            if s is None:
                cells = '<td colspan="9" class="muted">no site took part</td>'
            else:
                led = s.get("ledger")
                frames = (f"{led['up']['frames']} / {led['down']['frames']}" if led else "—")
                cells = (f"<td>{esc(s['site_id'])}</td><td>{_short(s['cert_fingerprint'], 12)}</td>"
                         f'<td class="n">{s["steps"]}</td><td class="n">{s["samples"]}</td>'
                         f'<td class="n">{_num(s["epsilon"])}</td><td class="n">{_num(s["delta"])}</td>'
                         f'<td class="n">{_num(agg["mean_site_norms"].get(s["site_id"]))}</td>'
                         f'<td class="n">{frames}</td><td class="n">{_num(s.get("train_loss"))}</td>')
            rows.append(cells)
        out.append('<tbody class="round"><tr>' + head + rows[0] + "</tr>"
                   + "".join(f"<tr>{r}</tr>" for r in rows[1:]) + "</tbody>")
    out.append("</table>")
    out.append("<h3>Round hashes (full SHA-256)</h3>")
    out += _table(["round", "backbone before", "backbone after", "checkpoint", "config", "software"],
                  [[f"{e['body']['round']}{ctx.flags(e)}",
                    _full(e["body"].get("backbone_hash_before")),
                    _full(e["body"].get("backbone_hash_after", e["body"].get("backbone_hash"))),
                    _full(e["body"]["checkpoint_hash"]), _full(e["body"].get("config_hash")),
                    esc(e["body"].get("software_version", "—"))] for e in rounds])
    return out


def _site_rounds(rounds: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    rows = []
    for e in rounds:
        b = e["body"]
        if e["kind"] == "site_round_backfill":
            rows.append([esc(b["site_id"]), f"{b['round']}{ctx.flags(e)}", str(e["seq"] + 1),
                         f'<span class="muted">recovered: {esc(b["reason"])}</span>', "—", "—", "—", "—", "—", "—",
                         "—", _short(b["checkpoint_hash"], 12)])
            continue
        led = b["ledger"]
        rows.append([esc(b["site_id"]), f"{b['round']}{ctx.flags(e)}", str(e["seq"] + 1), str(b["steps"]),
                     str(b["samples"]), _num(b["epsilon"]), _num(b["delta"]), str(led["up"]["frames"]),
                     str(led["up"]["bytes"]), str(led["down"]["frames"]), str(led["down"]["bytes"]),
                     _short(b["checkpoint_hash"], 12)])
    return (["<h3>Site rounds (this site's own record of each round)</h3>"]
            + _table(["site", "round", "line", "steps", "samples", "ε", "δ", "up frames", "up bytes", "down frames",
                      "down bytes", "checkpoint"], rows, numeric=range(2, 11)))


def _plots(run: str, rounds: list[dict[str, Any]], site_rounds: list[dict[str, Any]]) -> list[str]:
    out = ["<h3>ε per site over rounds</h3>"]
    eps: dict[str, list[tuple[float, float | None]]] = {}
    for e in rounds:
        for s in e["body"]["sites"]:
            eps.setdefault(s["site_id"], []).append((e["body"]["round"], s["epsilon"]))
    for e in site_rounds:
        if e["kind"] == "site_round":
            eps.setdefault(e["body"]["site_id"], []).append((e["body"]["round"], e["body"]["epsilon"]))
    if any(y is not None for s in eps.values() for _, y in s):
        out.append(svg_chart(sorted(eps.items()), title=f"ε per site, run {run}", x_label="round",
                             y_label="ε (cumulative)"))
        none = sorted(k for k, s in eps.items() if all(y is None for _, y in s))
        if none:
            out.append(f'<p class="muted">No ε reported by: {esc(", ".join(none))} (no differential privacy, '
                       "or not reported).</p>")
    else:
        out.append('<p class="muted">No site reported ε in this run (no differential privacy, or not '
                   "reported).</p>")
    if rounds:
        out.append("<h3>Conflict statistics over rounds</h3>")
        pairs = [(float(e["body"]["round"]), float(e["body"]["aggregation"]["conflicting_pairs_total"]))
                 for e in rounds]
        out.append(svg_chart([("conflicting gradient pairs (sum over the round's steps)", pairs)],
                             title=f"Conflicting pairs per round, run {run}", x_label="round", y_label="pairs",
                             bars=len(pairs) <= 200))
        cos: list[tuple[str, Sequence[tuple[float, float | None]]]] = [
            ("min cosine", [(e["body"]["round"], e["body"]["aggregation"]["min_cosine"]) for e in rounds]),
            ("mean cosine", [(e["body"]["round"], e["body"]["aggregation"]["mean_cosine"]) for e in rounds])]
        out.append(svg_chart(cos, title=f"Gradient cosines per round, run {run}", x_label="round",
                             y_label="cosine", y_zero=False))
    out.append("<h3>Training loss per site over rounds</h3>")
    by_site: dict[str, dict[int, float | None]] = {}
    for e in rounds:
        for s in e["body"]["sites"]:
            by_site.setdefault(s["site_id"], {})[e["body"]["round"]] = s.get("train_loss")
    # a round without the site, or without its loss, is a gap in the site's line (never interpolated)
    losses = {site: [(float(e["body"]["round"]), v.get(e["body"]["round"])) for e in rounds]
              for site, v in by_site.items()}
    reported = {k: v for k, v in losses.items() if any(y is not None for _, y in v)}
    if reported:
        out.append('<p class="muted">Each point is the mean training loss of one site over its steps of the round, '
                   "<b>as the site reported it</b> (<code>train_loss</code>): the signatures prove the server "
                   "recorded these values, not that the site computed them honestly.</p>")
        out.append(svg_chart(sorted(reported.items()), title=f"Training loss per site (self-reported), run {run}",
                             x_label="round", y_label="training loss", y_zero=False))
        none = sorted(set(losses) - set(reported))
        if none:
            out.append(f'<p class="muted">No training loss reported by: {esc(", ".join(none))}.</p>')
    else:
        out.append('<p id="no-loss">This log does not carry training losses: no site entry of its round records has '
                   "the optional <code>train_loss</code> field (logs written before it existed, or a server that "
                   "did not record losses; see <code>audit/schema.json</code>), so no loss plot is shown. Losses in "
                   "a run's other outputs are not covered by this log's signatures.</p>")
    return out


def _participants(recs: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    sites: dict[str, dict[str, Any]] = {}

    def site(name: str) -> dict[str, Any]:
        return sites.setdefault(name, {"certs": set(), "events": [], "rounds": 0, "steps": 0, "samples": 0,
                                       "eps": None, "delta": None, "planned": False})

    for e in recs:
        b, k, where = e["body"], e["kind"], f"line {e['seq'] + 1}"
        if k == "run_start":
            for name in b["sites"]:
                site(name)["planned"] = True
        elif k in ("join", "leave", "dropout", "revocation", "site_run_start"):
            d = site(b["site_id"])
            if b.get("cert_fingerprint"):
                d["certs"].add(b["cert_fingerprint"])
            detail = {"join": "joined", "leave": "left", "dropout": "dropped out", "revocation": "REVOKED",
                      "site_run_start": "site launch"}[k]
            rnd = f" round {b['round']}" if "round" in b else ""
            reason = f": {esc(b['reason'])}" if "reason" in b else ""
            d["events"].append(f"{detail}{rnd}{reason} ({esc(e['time'])}, {where}){ctx.flags(e)}")
        elif k == "round":
            for s in b["sites"]:
                d = site(s["site_id"])
                if s["cert_fingerprint"]:
                    d["certs"].add(s["cert_fingerprint"])
                d["rounds"] += 1
                d["steps"] += s["steps"]
                d["samples"] += s["samples"]
                d["eps"], d["delta"] = s["epsilon"], s["delta"]
        elif k == "site_round":
            d = site(b["site_id"])
            d["rounds"] += 1
            d["steps"] += b["steps"]
            d["samples"] += b["samples"]
            d["eps"], d["delta"] = b["epsilon"], b["delta"]
    rows = [[esc(name) + ("" if d["planned"] else ' <span class="muted">(not in run_start)</span>'),
             "<br>".join(_full(c) for c in sorted(d["certs"])) or '<span class="muted">none recorded</span>',
             str(d["rounds"]), str(d["steps"]), str(d["samples"]), _num(d["eps"]), _num(d["delta"]),
             "<br>".join(d["events"]) or "—"] for name, d in sorted(sites.items())]
    return (['<h2 id="participants">Participants</h2>',
             '<p class="muted">Sites appear under pseudonymous ids only. Totals are over the round records; ε/δ are '
             "the last values each site reported.</p>"]
            + _table(["site (pseudonymous id)", "certificate fingerprint", "rounds", "steps", "samples", "last ε",
                      "last δ", "join / leave / dropout / revocation events"], rows, numeric=range(2, 7)))


def _interruption_row(e: dict[str, Any], line: str) -> list[str]:
    b = e["body"]
    if e["kind"] == "round_interrupted":
        return [line, esc(e["time"]), esc(b["run_id"]), "server", str(b["round"]),
                f"resumed from its checkpoint (step {esc(b['step'])}): {esc(b['reason'])}", "—",
                _short(b["checkpoint_hash"]), _short(b["backbone_hash"])]
    frames = "<br>".join(f"round {x['round']}: {x['ledger']['up']['frames']} ({x['ledger']['up']['bytes']} B) / "
                         f"{x['ledger']['down']['frames']} ({x['ledger']['down']['bytes']} B)" for x in b["ledgers"])
    return [line, esc(e["time"]), esc(b["run_id"]), esc(b["site_id"]), str(b["round"]),
            f"rejoined at round {b['rejoined_round']}: {esc(b['reason'])}", frames, "—", "—"]


def _events(recs: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    def of(*kinds: str) -> list[dict[str, Any]]:
        return [e for e in recs if e["kind"] in kinds]

    def ln(e: dict[str, Any]) -> str:
        return f"{e['seq'] + 1}{ctx.flags(e)}"

    out = ['<h2 id="events">Events</h2>', "<h3>Back-filled rounds (recovered after a crash)</h3>"]
    out += _table(["line", "time", "run", "site", "round", "reason", "checkpoint", "backbone", "step",
                   "log's last round before"],
                  [[ln(e), esc(e["time"]), esc(e["body"]["run_id"]), esc(e["body"].get("site_id", "server")),
                    str(e["body"]["round"]), esc(e["body"]["reason"]), _short(e["body"]["checkpoint_hash"]),
                    _short(e["body"].get("backbone_hash")), esc(e["body"].get("step")),
                    esc(e["body"]["log_last_round"])] for e in of("round_backfill", "site_round_backfill")])
    out.append("<h3>Restarts and abandoned exchanges (frames the server could not book)</h3>")
    out += _table(["line", "time", "run", "party", "round", "what", "frames up / down (bytes)", "checkpoint",
                   "backbone"],
                  [_interruption_row(e, ln(e)) for e in of("round_interrupted", "site_round_interrupted")])
    out.append("<h3>Run ends (the exchange after each run's last round)</h3>")
    out += _table(["line", "time", "run", "party", "rounds", "tail frames up / down (bytes)", "final backbone",
                   "checkpoint"], [_run_end_row(e, ln(e)) for e in of("run_end", "site_run_end")])
    out.append("<h3>Skipped steps</h3>")
    out += _table(["line", "time", "round", "step", "reason", "sites"],
                  [[ln(e), esc(e["time"]), str(e["body"]["round"]), str(e["body"]["step"]), esc(e["body"]["reason"]),
                    esc(", ".join(e["body"]["sites"]))] for e in of("step_skipped")])
    out.append("<h3>Key rotations</h3>")
    out += _table(["line", "time", "old key id", "new key id"],
                  [[ln(e), esc(e["time"]), esc(e["body"]["old_key_id"]), esc(e["body"]["new_key_id"])]
                   for e in of("key_rotation")])
    out.append("<h3>Certificate revocations</h3>")
    out += _table(["line", "time", "site", "certificate", "reason"],
                  [[ln(e), esc(e["time"]), esc(e["body"]["site_id"]), _full(e["body"]["cert_fingerprint"]),
                    esc(e["body"]["reason"])] for e in of("revocation")])
    out.append("<h3>Configuration changes</h3>")
    out += _table(["line", "time", "round", "config before", "config after", "changed keys"],
                  [[ln(e), esc(e["time"]), str(e["body"]["round"]), _short(e["body"]["config_hash_before"]),
                    _short(e["body"]["config_hash_after"]), esc(", ".join(e["body"]["changed_keys"]))]
                   for e in of("config_change")])
    out.append("<h3>Checkpoint files written</h3>")
    out += _table(["line", "time", "round", "role", "checkpoint SHA-256"],
                  [[ln(e), esc(e["time"]), str(e["body"]["round"]), esc(e["body"]["role"]),
                    _full(e["body"]["checkpoint_hash"])] for e in of("checkpoint_write")])
    return out


def _run_end_row(e: dict[str, Any], line: str) -> list[str]:
    """One row of the run-ends table: the server's run_end (a tail per site) or a site's site_run_end."""
    b = e["body"]
    if e["kind"] == "run_end":
        party, tails = "server", [(x["site_id"], x["ledger"]) for x in b["sites"]]
    else:
        party, tails = b["site_id"], [(b["site_id"], b["ledger"])]
    frames = "; ".join(f"{name}: {led['up']['frames']} / {led['down']['frames']} "
                       f"({led['up']['bytes']} / {led['down']['bytes']} B)" for name, led in tails)
    return [line, esc(e["time"]), esc(b["run_id"]), esc(party), str(b["rounds"]), esc(frames or "nothing exchanged"),
            _short(b.get("backbone_hash")), _short(b.get("checkpoint_hash"))]


def _checkpoints(recs: list[dict[str, Any]], ctx: _Ctx) -> list[str]:
    return (['<h2 id="checkpoints">Signed checkpoints and Merkle roots</h2>',
             '<p class="muted">Each checkpoint is an Ed25519 signature over (record count, head hash, key id, run id, '
             "Merkle root). The Merkle root is the RFC 6962 tree hash of the lines before it; "
             "<code>fedbone-audit prove</code> gives inclusion and consistency proofs against it.</p>"]
            + _table(["line", "time", "count", "head", "Merkle root", "key id"],
                     [[ln, esc(e["time"]), str(e["body"]["count"]), _full(e["body"]["head"]),
                       _full(e["body"].get("merkle_root")) if e["body"].get("merkle_root")
                       else '<span class="muted">none (older checkpoint)</span>', esc(e["body"]["key_id"])]
                      for e in recs if e["kind"] == LOG_CHECKPOINT for ln in [str(e["seq"] + 1)]],
                     numeric=(0, 2)))


def _page(title: str, verdict: str, parts: list[str], generated: str) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f'<meta name="fedbone-audit-verification" content="{verdict}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>",
        f'<body data-verification="{verdict}">', *parts,
        f'<footer class="muted"><hr>Generated {esc(generated)} by fedbone-audit {esc(__version__)}. This page shows '
        "only what the log contains (identifiers, counts, hashes, statistics); it is not itself signed -- re-run "
        "<code>fedbone-audit verify</code> on the log to confirm.</footer>", "</body>", "</html>", ""])


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_html(report: VerifyReport, *, generated: str | None = None) -> str:
    """The HTML page of a verified log (``report`` from a successful :func:`verify_log`)."""
    parts = [f"<h1>Audit report: <code>{esc(report.path)}</code></h1>", *_verdict_ok(report),
             *_body_sections(report)]
    return _page(f"Audit report (verified OK): {Path(report.path).name}", "ok", parts, generated or _now())


def render_failure_html(path: str | Path, error: AuditError, prefix: VerifyReport | None = None, *,
                        generated: str | None = None) -> str:
    """The HTML page of a log that failed verification: the failure first; only a verified prefix after it."""
    check = error.check or "unknown"
    where = f"line {error.line}" if error.line else "the log as a whole"
    parts = [f"<h1>Audit report: <code>{esc(path)}</code></h1>",
             '<section id="verification" class="banner fail" data-verification="failed">',
             '<div class="verdict">Verification: FAILED</div>',
             f"<div>First bad record: <b>{esc(where)}</b>; failed check: <b><code>{esc(check)}</code></b> -- "
             f"{esc(CHECK_MEANING.get(check, 'see the message'))}.</div>",
             f"<div>Verifier message: <code>{esc(error)}</code></div>",
             "<div><b>Do not rely on this log as a whole.</b> Keep the file unchanged as evidence; compare it with an "
             "independently kept copy (e.g. a site's log, via <code>fedbone-audit cross-check</code>) to find what "
             "was altered.</div></section>"]
    if prefix is None:
        parts.append('<p id="prefix-none"><b>No part of this log could be verified</b> (there is no signed checkpoint '
                     "before the failing line that verifies), so no record contents are shown.</p>")
    else:
        last = prefix.count
        parts += ['<section class="prefix" id="verified-prefix">',
                  f'<p class="label">VERIFIED PREFIX ONLY: lines 1–{last} of the log. These lines are covered by the '
                  f"signed checkpoint at line {last}, which verifies on its own with the key(s) given. Nothing from "
                  f"line {last + 1} on is shown: those lines are not trusted.</p>",
                  f"<p>Verified prefix: {esc(prefix.summary())}</p>", *_body_sections(prefix), "</section>"]
    return _page(f"Audit report (verification FAILED): {Path(path).name}", "failed", parts, generated or _now())


def verified_prefix(path: str | Path, public_keys: Mapping[str, Ed25519PublicKey], error: AuditError
                    ) -> VerifyReport | None:
    """The longest prefix of the log ending at a signed checkpoint before ``error.line`` that verifies, or None.

    Every line before the failing line passed every check, so the prefix ending at the last
    ``log_checkpoint`` before it verifies (with ``require_complete=True``); it is re-verified
    from scratch on a copy anyway, so this never trusts anything the full verification did not.
    """
    if not error.line or error.line < 2:
        return None
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError:
        return None
    candidates = []
    for n in range(min(error.line - 1, len(lines)), 0, -1):
        try:
            env = json.loads(lines[n - 1])
        except ValueError:
            continue
        if isinstance(env, dict) and env.get("kind") == LOG_CHECKPOINT:
            candidates.append(n)
            if len(candidates) == 3:
                break
    with tempfile.TemporaryDirectory(prefix="fedbone-audit-prefix-") as tmp:
        for n in candidates:
            copy = Path(tmp) / Path(path).name
            copy.write_bytes(b"".join(line + b"\n" for line in lines[:n]))
            try:
                report = verify_log(copy, public_keys)
            except AuditError:
                continue
            report.path = str(path)
            return report
    return None


def html_report(path: str | Path, public_keys: Mapping[str, Ed25519PublicKey], *, require_complete: bool = True,
                generated: str | None = None) -> tuple[str, AuditError | None]:
    """Verify the log and return ``(page, None)``, or ``(failure page, error)`` when it fails.

    A log that cannot be read at all raises the AuditError instead (there is nothing to report).
    """
    try:
        report = verify_log(path, public_keys, require_complete=require_complete)
    except AuditError as exc:
        if exc.check == "read":
            raise
        return render_failure_html(path, exc, verified_prefix(path, public_keys, exc), generated=generated), exc
    return render_html(report, generated=generated), None

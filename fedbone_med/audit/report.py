"""Markdown summary of a *verified* audit log, for compliance reports.

Protects against reporting on an unverified log: :func:`render_report` takes the
:class:`~.verify.VerifyReport` that only a successful :func:`~.verify.verify_log` returns.
The report contains only what the log contains: identifiers, counts, hashes, statistics.
The auditor's self-contained HTML page (``fedbone-audit report LOG --out report.html``) is
rendered by :mod:`.html`; this Markdown form stays for scripts and compliance documents.
"""

from __future__ import annotations

from typing import Any

from .verify import VerifyReport


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def render_report(report: VerifyReport) -> str:
    """Return a Markdown report of the verified log ``report``."""
    recs = report.records
    out = [f"# Audit report: `{report.path}`", "",
           f"- Verification: **OK** — {report.summary()}",
           f"- Signing key id(s): {', '.join(report.key_ids) or 'none'}",
           f"- First record: {recs[0]['time']}; last record: {recs[-1]['time']}"]
    if report.unsigned_tail:
        out.append(f"- **Warning:** unsigned tail: {report.unsigned_tail} records after the last signed checkpoint "
                   "(truncated log or interrupted run); they are not covered by a signature.")
    out.append("")
    for run in report.runs:
        out += _run_section(run, [e for e in recs if e["body"]["run_id"] == run])
    out += ["## Signed checkpoints", ""]
    out += _table(["line", "time", "count", "head", "key id"],
                  [[str(e["seq"] + 1), e["time"], str(e["body"]["count"]), f"`{e['body']['head']}`",
                    e["body"]["key_id"]] for e in recs if e["kind"] == "log_checkpoint"])
    return "\n".join(out)


def _run_section(run: str, recs: list[dict[str, Any]]) -> list[str]:
    out = [f"## Run `{run}`", ""]
    for e in recs:
        if e["kind"] == "run_start":
            b = e["body"]
            out += [f"- Started {e['time']}; software {b['software_version']}; aggregation {b['aggregation_method']}",
                    f"- Config hash `{b['config_hash']}`; initial backbone `{b['backbone_hash']}`",
                    f"- Planned sites: {', '.join(b['sites'])}", ""]
    rounds = [e["body"] for e in recs if e["kind"] == "round"]
    if rounds:
        out += _server_rounds(rounds)
    site_rounds = [e["body"] for e in recs if e["kind"] == "site_round"]
    if site_rounds:
        out += ["### Site rounds (this site's own record of each round)", ""]
        out += _table(["site", "round", "steps", "samples", "ε", "δ", "up frames", "up bytes", "down frames",
                       "down bytes", "checkpoint"],
                      [[b["site_id"], str(b["round"]), str(b["steps"]), str(b["samples"]), _num(b["epsilon"]),
                        _num(b["delta"]), str(b["ledger"]["up"]["frames"]), str(b["ledger"]["up"]["bytes"]),
                        str(b["ledger"]["down"]["frames"]), str(b["ledger"]["down"]["bytes"]),
                        f"`{b['checkpoint_hash'][:16]}…`" if b["checkpoint_hash"] else "—"] for b in site_rounds])
    events = [e for e in recs if e["kind"] not in ("round", "run_start", "log_checkpoint", "site_round")]
    if events:
        out += ["### Other events", ""]
        out += _table(["line", "time", "kind", "details"],
                      [[str(e["seq"] + 1), e["time"], e["kind"], _details(e["body"])] for e in events])
    return out


def _ledger_text(led: dict[str, Any]) -> str:
    return " / ".join(f"{d} {led[d]['frames']} frames {led[d]['bytes']} B" for d in ("up", "down"))


def _details(body: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        if isinstance(v, list) and all(isinstance(x, dict) and set(x) == {"site_id", "ledger"} for x in v):
            return ", ".join(f"{x['site_id']}: {_ledger_text(x['ledger'])}" for x in v)  # run_end tails
        if isinstance(v, list) and all(isinstance(x, dict) and set(x) == {"round", "ledger"} for x in v):
            return ", ".join(f"round {x['round']}: {_ledger_text(x['ledger'])}" for x in v)  # abandoned exchanges
        if isinstance(v, dict) and set(v) == {"up", "down"}:
            return _ledger_text(v)
        return ",".join(map(str, v)) if isinstance(v, list) else "null" if v is None else str(v)

    return "; ".join(f"{k}={text(v)}" for k, v in sorted(body.items()) if k != "run_id")


def _server_rounds(rounds: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    out += ["### Rounds", ""]
    out += _table(["round", "started", "ended", "sites", "samples", "method", "conflicting pairs", "min cos",
                   "mean cos", "backbone after", "checkpoint"],
                  [[str(b["round"]), b["started_at"], b["ended_at"], str(len(b["sites"])),
                    str(sum(s["samples"] for s in b["sites"])), b["aggregation"]["method"],
                    str(b["aggregation"]["conflicting_pairs_total"]), _num(b["aggregation"]["min_cosine"]),
                    _num(b["aggregation"]["mean_cosine"]), f"`{b['backbone_hash_after'][:16]}…`",
                    f"`{b['checkpoint_hash'][:16]}…`" if b["checkpoint_hash"] else "—"] for b in rounds])
    per_site: dict[str, dict[str, Any]] = {}
    for b in rounds:
        for s in b["sites"]:
            d = per_site.setdefault(s["site_id"], {"rounds": 0, "steps": 0, "samples": 0, "eps": [], "norms": []})
            d["rounds"] += 1
            d["steps"] += s["steps"]
            d["samples"] += s["samples"]
            d["eps"].append(f"r{b['round']}: {_num(s['epsilon'])}")
            norm = b["aggregation"]["mean_site_norms"].get(s["site_id"])
            if norm is not None:
                d["norms"].append(norm)
    out += ["### Site participation (ε and δ as reported by each site)", ""]
    out += _table(["site", "rounds", "steps", "samples", "mean gradient norm", "ε trajectory"],
                  [[site, str(d["rounds"]), str(d["steps"]), str(d["samples"]),
                    _num(sum(d["norms"]) / len(d["norms"]) if d["norms"] else None), ", ".join(d["eps"])]
                   for site, d in sorted(per_site.items())])
    return out

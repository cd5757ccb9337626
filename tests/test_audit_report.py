"""The auditor's HTML report: content, escaping, failing logs, and rendering in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedbone_med.audit import records as R
from fedbone_med.audit.html import html_report, render_html
from fedbone_med.audit.keys import key_from_seed, key_id, load_public_keys, save_public_key
from fedbone_med.audit.log import AuditLog
from fedbone_med.audit.samples import EXPECTED_FAILURES, fixed_clock
from fedbone_med.audit.verify import verify_log
from fedbone_med.cli.audit import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "audit" / "samples"
PEM = SAMPLES / "samples-public-key.pem"
KEYS = load_public_keys([PEM])
GOOD_ROUNDS = 3
CHROMIUM = shutil.which("chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed: install it with `apt-get install -y chromium` "
    "(Debian's chromium package) to run the browser rendering test")


class _Tags(HTMLParser):
    """Collects tags and their attributes, to check the page is self-contained and nothing was injected."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def _assert_self_contained(page: str) -> None:
    tags = _tags(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "img", "iframe", "object", "embed", "link", "base", "form"}, names
    for tag, attrs in tags:
        for attr in ("src", "href", "xlink:href", "action"):
            value = attrs.get(attr)
            assert value is None or value.startswith("#") or value.startswith("data:"), (tag, attr, value)
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
    assert "@import" not in page and "url(" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def _good_page() -> str:
    page, error = html_report(SAMPLES / "good.jsonl", KEYS, generated="2026-01-06T00:00:00Z")
    assert error is None
    return page


def test_good_sample_shows_verification_and_every_round() -> None:
    page = _good_page()
    report = verify_log(SAMPLES / "good.jsonl", KEYS)
    _assert_self_contained(page)
    assert 'data-verification="ok"' in page and "Verification: OK" in page and "FAILED" not in page
    assert report.summary() in page
    rounds = [e for e in report.records if e["kind"] == "round"]
    assert len(rounds) == GOOD_ROUNDS
    for e in rounds:
        b = e["body"]
        for h in (b["checkpoint_hash"], b["backbone_hash_before"], b["backbone_hash_after"]):
            assert f"<code>{h}</code>" in page  # full hashes in the round-hash table
        assert b["started_at"] in page and b["ended_at"] in page
        for s in b["sites"]:
            assert s["site_id"] in page
    # the dropout and the joins are in the participants table; ε plot and conflict plots are inline SVG
    assert "dropped out round 1: timeout" in page and page.count("joined round 0") == 3
    assert page.count("<svg") == 4 and "ε per site" in page and "Conflicting pairs per round" in page
    assert 'id="no-loss"' not in page and "Training loss per site (self-reported)" in page
    for e in report.records:
        if e["kind"] == "log_checkpoint":
            assert f"<code>{e['body']['merkle_root']}</code>" in page and f"<code>{e['body']['head']}</code>" in page


def test_every_round_has_one_row_block_in_the_round_table() -> None:
    page = _good_page()
    table = page[page.index("<h3>Rounds (server record)</h3>"):page.index("<h3>Round hashes")]
    blocks = re.findall(r'<tbody class="round"><tr><td class="n"[^>]*>(\d+)', table)
    assert blocks == [str(r) for r in range(GOOD_ROUNDS)]


def _loss_chart(page: str) -> str:
    start = page.index('aria-label="Training loss per site')
    return page[start:page.index("</figure>", start)]


def test_loss_plot_has_one_line_per_site_from_train_loss() -> None:
    page = _good_page()
    report = verify_log(SAMPLES / "good.jsonl", KEYS)
    rounds = [e["body"] for e in report.records if e["kind"] == "round"]
    losses: dict[str, list[float]] = {}
    for b in rounds:
        for s in b["sites"]:
            losses.setdefault(s["site_id"], []).append(s["train_loss"])
    assert set(losses) == {"site-01", "site-02", "site-03"} and len(losses["site-03"]) == 2
    chart = _loss_chart(page)
    # site-03 dropped out of round 1: its line has a gap there, so it is drawn as two lone points
    assert chart.count("<polyline") == 2 and chart.count("<circle") == sum(map(len, losses.values())) == 8
    legend = chart[chart.index("<figcaption"):]
    assert all(site in legend for site in losses)
    assert "as the site reported it" in page
    for b in rounds:  # the round table shows each site's loss
        for s in b["sites"]:
            assert f'<td class="n">{s["train_loss"]:.4g}</td></tr>' in page


def test_log_without_losses_still_verifies_and_says_so(tmp_path: Path) -> None:
    log, pem = _hostile_log(tmp_path)  # round records written without train_loss
    page, error = html_report(log, load_public_keys([pem]))
    assert error is None and 'id="no-loss"' in page and "Training loss per site (self-reported)" not in page
    assert '"train_loss"' not in log.read_text()


def test_loss_plot_skips_sites_without_a_loss(tmp_path: Path) -> None:
    key = key_from_seed(bytes(range(32)))
    pem = tmp_path / "k.pem"
    save_public_key(key.public_key(), pem)
    h = "ab" * 32
    log = tmp_path / "l.jsonl"
    with AuditLog(log, key, clock=fixed_clock()) as a:
        for r in range(3):
            a.append(R.round_record(
                run_id="run-l", round=r, started_at="2026-01-05T09:00:00Z", ended_at="2026-01-05T09:01:00Z",
                sites=[R.SiteRound(site_id="site-a", steps=2, samples=8, train_loss=1.0 / (r + 1)),
                       R.SiteRound(site_id="site-b", steps=2, samples=8)],
                aggregation=R.AggregationSummary(method="mean", steps=2, conflicting_pairs_total=0, min_cosine=None,
                                                 mean_cosine=None, mean_site_norms={}),
                backbone_hash_before=h, backbone_hash_after=h, checkpoint_hash=h, config_hash=h,
                software_version="0.1.0"))
            a.checkpoint()
    page, error = html_report(log, load_public_keys([pem]))
    assert error is None
    chart = _loss_chart(page)
    assert "site-a" in chart and "site-b" not in chart and chart.count("<circle") == 3
    assert "No training loss reported by: site-b." in page


def _hostile_log(tmp_path: Path) -> tuple[Path, Path]:
    """A validly signed log whose site id, reason and role carry HTML (site ids cannot hold '/')."""
    key = key_from_seed(bytes(range(32)))
    pem = tmp_path / "k.pem"
    save_public_key(key.public_key(), pem)
    evil = "<script>alert(1)"
    reason = '<img src=x onerror=alert(1)> "quoted" & more'
    h = "ab" * 32
    log = tmp_path / "evil.jsonl"
    with AuditLog(log, key, clock=fixed_clock()) as a:
        a.append(R.run_start(run_id="run-<b>", config_hash=h, software_version="0.1.0", backbone_hash=h,
                             aggregation_method="projection<i>", sites=[evil, "ok-site"]))
        a.append(R.join(run_id="run-<b>", round=0, site_id=evil, cert_fingerprint='"><svg onload=alert(1)>'))
        a.append(R.dropout(run_id="run-<b>", round=0, site_id="ok-site", reason=reason))
        a.append(R.step_skipped(run_id="run-<b>", round=0, step=1, reason=reason, sites=[evil]))
        a.append(R.round_record(
            run_id="run-<b>", round=0, started_at="2026-01-05T09:00:00Z", ended_at="2026-01-05T09:01:00Z",
            sites=[R.SiteRound(site_id=evil, steps=2, samples=8, epsilon=0.5, delta=1e-5)],
            aggregation=R.AggregationSummary(method="mean<u>", steps=2, conflicting_pairs_total=0, min_cosine=0.1,
                                             mean_cosine=0.2, mean_site_norms={evil: 1.0}),
            backbone_hash_before=h, backbone_hash_after=h, checkpoint_hash=h, config_hash=h, software_version="v<1>"))
        a.checkpoint()
        a.append(R.key_rotation(run_id="run-<b>", old_key_id="<old>", new_key_id="<new>"))
        a.checkpoint()
    return log, pem


def test_everything_from_the_log_is_html_escaped(tmp_path: Path) -> None:
    log, pem = _hostile_log(tmp_path)
    page, error = html_report(log, load_public_keys([pem]))
    assert error is None
    _assert_self_contained(page)  # no script/img tag, no on* attribute survived
    assert "<script>alert" not in page and "<img src=x" not in page and "<svg onload" not in page
    assert "&lt;script&gt;alert(1)" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &quot;quoted&quot; &amp; more" in page
    assert "&quot;&gt;&lt;svg onload=alert(1)&gt;" in page
    for raw in ("run-<b>", "projection<i>", "mean<u>", "v<1>", "<old>", "<new>"):
        assert raw not in page
    assert "run-&lt;b&gt;" in page and "&lt;old&gt;" in page
    # the malicious id also reaches the SVG legend and the chart title, escaped
    svg_titles = re.findall(r"<title>(.*?)</title>", page)
    assert all("<" not in t for t in svg_titles)


def test_tampered_sample_page_shows_the_failure_and_only_the_verified_prefix(tmp_path: Path) -> None:
    good = verify_log(SAMPLES / "good.jsonl", KEYS)
    page, error = html_report(SAMPLES / "tampered-edit.jsonl", KEYS)
    assert error is not None and error.check == "hash-chain" and error.line == 8
    _assert_self_contained(page)
    assert 'data-verification="failed"' in page and "Verification: FAILED" in page and "Verification: OK" not in page
    head = page[:page.index('id="verified-prefix"')]
    assert "First bad record: <b>line 8</b>" in head and "<code>hash-chain</code>" in head
    assert "VERIFIED PREFIX ONLY: lines 1–5" in page
    # nothing after the prefix (the checkpoint at line 5) is shown: no round, no round hash
    for e in good.records[5:]:
        if e["kind"] == "round":
            assert e["body"]["checkpoint_hash"] not in page and e["body"]["backbone_hash_after"] not in page
    assert "<h3>Rounds (server record)</h3>" not in page
    for name, check in EXPECTED_FAILURES.items():
        page, error = html_report(SAMPLES / name, KEYS)
        assert error is not None and error.check == check, name
        assert "Verification: FAILED" in page and f"<code>{check}</code>" in page, name


def test_wrong_key_shows_no_record_contents(tmp_path: Path) -> None:
    other = key_from_seed(bytes(32))
    page, error = html_report(SAMPLES / "good.jsonl", {key_id(other.public_key()): other.public_key()})
    assert error is not None and error.check == "signature" and error.line == 5
    assert 'id="prefix-none"' in page and "site-01" not in page and "Verification: OK" not in page


def test_unsigned_tail_is_flagged(tmp_path: Path) -> None:
    page, error = html_report(SAMPLES / "truncated.jsonl", KEYS, require_complete=False)
    assert error is None and "Warning: unsigned tail" in page and "flag unsigned" in page


def test_cli_picks_html_or_markdown_by_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(SAMPLES / "good.jsonl"), "--public-key", str(PEM), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    md = tmp_path / "report.md"
    assert main(["report", str(SAMPLES / "good.jsonl"), "--public-key", str(PEM), "--out", str(md)]) == 0
    assert md.read_text(encoding="utf-8").startswith("# Audit report") and "<html" not in md.read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.HTM"
    assert main(["report", str(SAMPLES / "tampered-edit.jsonl"), "--public-key", str(PEM), "--out", str(bad)]) == 8
    assert "line 8: hash-chain check failed" in capsys.readouterr().err
    assert "Verification: FAILED" in bad.read_text(encoding="utf-8")
    bad_md = tmp_path / "bad.md"  # Markdown keeps refusing a failing log
    assert main(["report", str(SAMPLES / "tampered-edit.jsonl"), "--public-key", str(PEM), "--out", str(bad_md)]) == 8
    assert not bad_md.exists()


def test_render_html_of_a_site_log() -> None:
    from fedbone_med.audit.samples import site_sample_key

    pub = site_sample_key().public_key()
    page = render_html(verify_log(SAMPLES / "site-01.jsonl", {key_id(pub): pub}))
    assert "Site rounds (this site" in page and "Rounds (server record)" not in page and "<svg" in page


# ---- headless Chromium (Debian's chromium package) ----

# With --enable-logging=stderr Chromium logs every console message of the page (errors, uncaught
# exceptions, Content-Security-Policy violations, failed loads) as ":CONSOLE" lines. The page has
# no script, so any such line is a page error; a self-check below proves the detector sees them.
PAGE_ERROR = re.compile(r":CONSOLE|Uncaught|violates the following Content Security Policy|net::ERR_")


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, url],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)


@NEEDS_CHROMIUM
def test_headless_chromium_renders_the_report_without_page_errors(tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"  # the detector must see a page error, or a clean run proves nothing
    probe.write_text("<!DOCTYPE html><html><body><script>undefined_function()</script></body></html>")
    assert PAGE_ERROR.search(_chromium(tmp_path, probe.as_uri(), "--dump-dom").stderr)

    good = tmp_path / "good.html"
    assert main(["report", str(SAMPLES / "good.jsonl"), "--public-key", str(PEM), "--out", str(good)]) == 0
    run = _chromium(tmp_path, good.as_uri(), "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if PAGE_ERROR.search(line)]
    assert not errors, errors
    assert 'data-verification="ok"' in run.stdout and "Verification: OK" in run.stdout
    assert "Run ends (the exchange after each run" in run.stdout and "site-01: 1 / 1 (96 / 160 B)" in run.stdout
    assert "17 records, 5 signed checkpoints" in run.stdout and run.stdout.count("<svg") == 4

    shot = tmp_path / "good.png"
    run = _chromium(tmp_path, good.as_uri(), "--window-size=1400,2000", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.stat().st_size > 10_000
    assert not [line for line in run.stderr.splitlines() if PAGE_ERROR.search(line)]

    bad = tmp_path / "bad.html"
    assert main(["report", str(SAMPLES / "tampered-edit.jsonl"), "--public-key", str(PEM), "--out", str(bad)]) == 8
    run = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert run.returncode == 0 and not [line for line in run.stderr.splitlines() if PAGE_ERROR.search(line)]
    assert "Verification: FAILED" in run.stdout and "Verification: OK" not in run.stdout

"""Audit log: canonical JSON, records, hash chain, signatures, attacks, keys, CLI, samples."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from fedbone_med.audit import records as R
from fedbone_med.audit.canonical import canonical_json, sha256_hex
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.keys import (
    generate_key,
    key_from_seed,
    key_id,
    keygen,
    load_private_key,
    public_pem,
    save_private_key,
)
from fedbone_med.audit.log import AuditLog, checkpoint_payload
from fedbone_med.audit.report import render_report
from fedbone_med.audit.samples import EXPECTED_FAILURES, fixed_clock, sample_key, write_samples
from fedbone_med.audit.verify import verify_log
from fedbone_med.cli.audit import main

REPO = Path(__file__).resolve().parents[1]
KEY = key_from_seed(bytes(range(32)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
H = "ab" * 32
RUN = "run-test"
LEDGER = {"up": {"frames": 2, "bytes": 10, "digest": H, "types": {"forward": 2}},
          "down": {"frames": 0, "bytes": 0, "digest": "0" * 64, "types": {}}}


def _round(r: int) -> R.Record:
    sites = [R.SiteRound(site_id="site-a", steps=2, samples=16, epsilon=0.5 * (r + 1), delta=1e-5),
             R.SiteRound(site_id="site-b", steps=2, samples=8)]
    agg = R.AggregationSummary(method="projection", steps=2, conflicting_pairs_total=1, min_cosine=-0.1,
                               mean_cosine=0.2, mean_site_norms={"site-a": 1.0, "site-b": 2})
    return R.round_record(run_id=RUN, round=r, started_at="2026-01-01T00:00:00Z", ended_at="2026-01-01T00:01:00Z",
                          sites=sites, aggregation=agg, backbone_hash_before=H, backbone_hash_after=H,
                          checkpoint_hash=None, config_hash=H, software_version="0.1.0")


def _make_log(path: Path, n: int = 20, every: int = 5, final_checkpoint: bool = True) -> Path:
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.run_start(run_id=RUN, config_hash=H, software_version="0.1.0", backbone_hash=H,
                               aggregation_method="projection", sites=["site-a", "site-b"]))
        for r in range(n - 1):
            log.append(_round(r))
            if (r + 1) % every == 0:
                log.checkpoint()
        if final_checkpoint:
            log.checkpoint()
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _fails(path: Path, check: str, keys: Any = None, **kw: Any) -> AuditError:
    with pytest.raises(AuditError) as info:
        verify_log(path, KEYS if keys is None else keys, **kw)
    assert info.value.check == check, str(info.value)
    assert check in str(info.value)
    return info.value


# ---- canonical JSON ----

def test_canonical_known_answers() -> None:
    assert canonical_json({"b": 1, "a": [1.5, None, True, "é"]}) == '{"a":[1.5,null,true,"é"],"b":1}'.encode()
    assert canonical_json(0.1) == b"0.1"
    assert canonical_json(1.0) == b"1.0"
    assert canonical_json(10**20) == b"100000000000000000000"
    assert canonical_json(1e-7) == b"1e-07"
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("value, where", [
    ({"x": float("nan")}, "$.x"), ({"x": [float("inf")]}, "$.x[0]"), ({"x": {"y": (1, 2)}}, "$.x.y"),
    ({"x": b"1"}, "$.x"), ({1: 2}, "$"), ({"s": {1, 2}}, "$.s"),
])
def test_canonical_refusals(value: Any, where: str) -> None:
    with pytest.raises(AuditError, match=re.escape(where)):
        canonical_json(value)


# ---- records and schema ----

def test_records_refuse_unknown_fields_and_pathlike_strings() -> None:
    with pytest.raises(AuditError, match="unknown field"):
        R.make("join", run_id=RUN, round=0, site_id="a", cert_fingerprint=None, filename="x")
    with pytest.raises(AuditError, match="unknown field"):
        R.round_record(**{**_round(0).body, "sites": [{"site_id": "a", "steps": 1, "samples": 1, "epsilon": None,
                                                        "delta": None, "cert_fingerprint": None, "extra": 1}]})
    for bad in ("/data/patients/p1.dcm", "scan_0001.DCM", "C:\\x", "..\\a", "~/x", "img.png", "x" * 257):
        with pytest.raises(AuditError, match="site_id"):
            R.join(run_id=RUN, round=0, site_id=bad)
    with pytest.raises(AuditError, match="unknown audit record kind"):
        R.make("patient", run_id=RUN)
    with pytest.raises(AuditError, match="finite"):
        R.round_record(**{**_round(0).body, "sites": [R.SiteRound("a", 1, 1, epsilon=float("nan"))]})
    with pytest.raises(AuditError, match="SHA-256"):
        R.checkpoint_write(run_id=RUN, round=0, role="server", checkpoint_hash="not-a-hash")


def _check_schema(schema: dict[str, Any], node: dict[str, Any], value: Any, path: str) -> None:
    types = node.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        py = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
              "object": dict, "array": list}
        assert any(isinstance(value, py[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                   for t in types), f"{path}: {value!r} is not {types}"
    if "const" in node:
        assert value == node["const"], path
    if "enum" in node:
        assert value in node["enum"], path
    if isinstance(value, str) and "pattern" in node:
        assert re.search(node["pattern"], value), f"{path}: pattern"
    if isinstance(value, dict):
        assert set(node.get("required", [])) <= set(value), f"{path}: missing required"
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                _check_schema(schema, props[k], v, f"{path}.{k}")
            elif extra is False:
                raise AssertionError(f"{path}: unexpected {k}")
            elif isinstance(extra, dict):
                _check_schema(schema, extra, v, f"{path}.{k}")
    if isinstance(value, list) and "items" in node:
        for i, v in enumerate(value):
            _check_schema(schema, node["items"], v, f"{path}[{i}]")


def test_schema_file_is_current_and_describes_records(tmp_path: Path) -> None:
    text = (REPO / "audit" / "schema.json").read_text(encoding="utf-8")
    assert text == R.schema_text(), "regenerate audit/schema.json from records.schema_text()"
    schema = json.loads(text)
    assert set(schema["$defs"]) == set(R.KINDS)
    log = _make_log(tmp_path / "a.jsonl", n=3, every=1)
    with AuditLog(log, KEY, clock=fixed_clock()) as a:
        for rec in (R.join(run_id=RUN, round=1, site_id="site-c", cert_fingerprint="sha256:00ff"),
                    R.leave(run_id=RUN, round=2, site_id="site-c", reason="finished"),
                    R.dropout(run_id=RUN, round=2, site_id="site-b", reason="timeout"),
                    R.step_skipped(run_id=RUN, round=2, step=3, reason="non-finite gradient", sites=["site-b"]),
                    R.config_change(run_id=RUN, round=2, config_hash_before=H, config_hash_after="cd" * 32,
                                    changed_keys=["server.optimizer.lr"]),
                    R.key_rotation(run_id=RUN, old_key_id="0" * 16, new_key_id="1" * 16),
                    R.revocation(run_id=RUN, site_id="site-c", reason="certificate revoked"),
                    R.checkpoint_write(run_id=RUN, round=2, role="server", checkpoint_hash=H),
                    R.round_backfill(run_id=RUN, round=2, reason="recovered", checkpoint_hash=H, step=6,
                                     log_last_round=1),
                    R.round_interrupted(run_id=RUN, round=3, checkpoint_hash=H, backbone_hash=H, step=6,
                                        reason="resumed"),
                    R.round_record(**{**_round(3).body, "sites": [R.SiteRound("site-a", 1, 1, ledger=LEDGER)]}),
                    R.site_run_start(run_id=RUN, site_id="site-a", round=0, software_version="0.1.0"),
                    R.site_round(run_id=RUN, site_id="site-a", round=0, steps=2, samples=16, ledger=LEDGER,
                                 epsilon=0.5, delta=1e-5, checkpoint_hash=H),
                    R.site_round_backfill(run_id=RUN, site_id="site-a", round=1, reason="recovered"),
                    R.site_round_interrupted(run_id=RUN, site_id="site-a", round=2, rejoined_round=2,
                                             ledgers={2: LEDGER}, reason="server restarted"),
                    R.run_end(run_id=RUN, rounds=4, sites={"site-a": LEDGER}, backbone_hash=H, checkpoint_hash=H),
                    R.site_run_end(run_id=RUN, site_id="site-a", rounds=2, ledger=LEDGER)):
            a.append(rec)
        a.checkpoint()
    kinds = set()
    for line in _lines(log):
        env = json.loads(line)
        kinds.add(env["kind"])
        _check_schema(schema, schema, env, "$")
        _check_schema(schema, schema["$defs"][env["kind"]], env["body"], "$.body")
    assert kinds == set(R.KINDS)
    assert verify_log(log, KEYS).count == len(_lines(log))


# ---- log and verification ----

def test_chain_of_20_records_verifies(tmp_path: Path) -> None:
    report = verify_log(_make_log(tmp_path / "a.jsonl"), KEYS)
    assert report.count == 20 + 4 and report.signed_checkpoints == 4 and report.unsigned_tail == 0
    assert report.runs == [RUN] and report.sites == ["site-a", "site-b"]
    assert report.rounds[RUN] == list(range(19))
    assert report.epsilon["site-a"][:2] == [(RUN, 0, 0.5), (RUN, 1, 1.0)]
    assert report.epsilon["site-b"][0] == (RUN, 0, None)
    md = render_report(report)
    assert "site-a" in md and "Signed checkpoints" in md


def test_each_line_is_canonical_and_chained(tmp_path: Path) -> None:
    lines = _lines(_make_log(tmp_path / "a.jsonl", n=3))
    prev = "0" * 64
    for i, line in enumerate(lines):
        env = json.loads(line)
        assert canonical_json(env) == line and env["seq"] == i and env["prev"] == prev
        prev = sha256_hex(line)


def test_edit_a_value_detected(tmp_path: Path) -> None:
    log = _make_log(tmp_path / "a.jsonl")
    lines = _lines(log)
    env = json.loads(lines[3])
    env["body"]["sites"][0]["samples"] = 9999
    lines[3] = canonical_json(env)
    assert _fails(_write(log, lines), "hash-chain").line == 5


def test_edit_in_last_covered_record_detected_by_checkpoint(tmp_path: Path) -> None:
    log = _make_log(tmp_path / "a.jsonl", n=3, every=100)
    lines = _lines(log)
    # rewrite record 2 and re-chain the checkpoint's prev: the signed head no longer matches
    env = json.loads(lines[2])
    env["body"]["sites"][0]["samples"] = 7
    lines[2] = canonical_json(env)
    ck = json.loads(lines[3])
    ck["prev"] = sha256_hex(lines[2])
    lines[3] = canonical_json(ck)
    _fails(_write(log, lines), "checkpoint")
    # ...and if the forger also updates head, the signature fails
    ck["body"]["head"] = ck["prev"]
    lines[3] = canonical_json(ck)
    _fails(_write(log, lines), "signature")


@pytest.mark.parametrize("reformat", [
    lambda b: b.replace(b'"seq":', b'"seq": '),
    lambda b: json.dumps(json.loads(b), sort_keys=False).encode(),
    lambda b: b.replace(b'"epsilon":1.0', b'"epsilon":1.00'),
    lambda b: b + b" ",
])
def test_edit_only_format_detected(tmp_path: Path, reformat: Any) -> None:
    log = _make_log(tmp_path / "a.jsonl")
    lines = _lines(log)
    lines[2] = reformat(lines[2])
    assert _fails(_write(log, lines), "canonical-json").line == 3


@pytest.mark.parametrize("name, mutate, check, line", [
    ("delete middle", lambda ls: ls[:7] + ls[8:], "sequence", 8),
    ("delete first", lambda ls: ls[1:], "sequence", 1),
    ("swap", lambda ls: ls[:3] + [ls[4], ls[3]] + ls[5:], "sequence", 4),
    ("duplicate", lambda ls: ls[:4] + [ls[3]] + ls[4:], "sequence", 5),
])
def test_structural_attacks_detected(tmp_path: Path, name: str, mutate: Any, check: str, line: int) -> None:
    log = _make_log(tmp_path / "a.jsonl")
    assert _fails(_write(log, mutate(_lines(log))), check).line == line


def test_truncate_after_checkpoint_reports_unsigned_tail(tmp_path: Path) -> None:
    log = _make_log(tmp_path / "a.jsonl")
    lines = _lines(log)
    ck = max(i for i, line in enumerate(lines) if b"log_checkpoint" in line)
    _write(log, lines[:ck - 2])  # the final checkpoint and the two records before it are gone
    err = _fails(log, "unsigned-tail")
    assert "unsigned tail: 2 records" in str(err) and err.line == 20
    report = verify_log(log, KEYS, require_complete=False)
    assert report.unsigned_tail == 2 and report.signed_checkpoints == 3


def test_truncate_mid_line_detected(tmp_path: Path) -> None:
    log = _make_log(tmp_path / "a.jsonl")
    data = log.read_bytes()
    log.write_bytes(data[:-40])
    assert _fails(log, "torn-line").line == 24


def test_empty_log_refused(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    _fails(tmp_path / "e.jsonl", "empty")


def test_forged_signature_and_replaced_public_key(tmp_path: Path) -> None:
    other = generate_key()
    # a whole log written by another key, verified against the real public key
    forged = tmp_path / "forged.jsonl"
    with AuditLog(forged, other, clock=fixed_clock()) as log:
        log.append(R.join(run_id=RUN, round=0, site_id="a"))
        log.checkpoint()
    assert "unknown key_id" in str(_fails(forged, "signature"))
    # forger keeps our key_id but signs with its own key
    log_path = _make_log(tmp_path / "a.jsonl", n=3, every=100)
    lines = _lines(log_path)
    ck = json.loads(lines[-1])
    b = ck["body"]
    b["signature"] = base64.b64encode(other.sign(checkpoint_payload(b["count"], b["head"], b["key_id"],
                                                                     b["run_id"]))).decode()
    lines[-1] = canonical_json(ck)
    assert "invalid checkpoint signature" in str(_fails(_write(log_path, lines), "signature"))
    # an auditor handed a different public key cannot verify the genuine log
    genuine = _make_log(tmp_path / "b.jsonl", n=3)
    _fails(genuine, "signature", keys={key_id(other.public_key()): other.public_key()})
    # nor can a substituted key be passed off under the genuine key_id
    _fails(genuine, "signature", keys={key_id(KEY.public_key()): other.public_key()})


def test_reopen_continues_sequence(tmp_path: Path) -> None:
    path = _make_log(tmp_path / "a.jsonl", n=3)
    before = len(_lines(path))
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        assert log.seq == before
        log.append(_round(2))
        log.checkpoint()
    assert verify_log(path, KEYS).count == before + 2


@pytest.mark.parametrize("where", ["fsync", "bookkeeping"])
def test_an_append_interrupted_after_its_write_does_not_reuse_a_sequence_number(tmp_path: Path, monkeypatch,
                                                                              where: str) -> None:
    """Ctrl-C (KeyboardInterrupt) or a failing fsync after the line reached the file: the record is
    in the log, so the next append must follow it (seq, chain and Merkle root), not overwrite its number."""
    import fedbone_med.audit.log as log_module

    path = tmp_path / "a.jsonl"
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.run_start(run_id=RUN, config_hash=H, software_version="0.1.0", backbone_hash=H,
                               aggregation_method="projection", sites=["site-a", "site-b"]))
        log.append(_round(0))
        real = log_module.os.fsync if where == "fsync" else log_module.sha256_hex
        calls = {"n": 0}

        def interrupted(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
            return real(*args)

        if where == "fsync":
            monkeypatch.setattr(log_module.os, "fsync", interrupted)
        else:  # after the Merkle tree took the line, before seq and head moved
            monkeypatch.setattr(log_module, "sha256_hex", interrupted)
        with pytest.raises(KeyboardInterrupt):
            log.append(_round(1))
        monkeypatch.undo()
        assert len(_lines(path)) == 3  # the interrupted record is in the file
        assert log.seq == 3  # ... and accounted for
        log.append(_round(2))
        log.checkpoint()
    report = verify_log(path, KEYS)
    assert report.count == 5
    assert [json.loads(line)["seq"] for line in _lines(path)] == [0, 1, 2, 3, 4]


def test_a_torn_write_while_open_is_refused_at_the_next_append(tmp_path: Path) -> None:
    path = _make_log(tmp_path / "a.jsonl", n=3)
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        with open(path, "ab") as f:  # what a cut write leaves behind
            f.write(b'{"body":{"run_')
        with pytest.raises(AuditError, match="incomplete line") as info:
            log.append(_round(5))
        assert info.value.check == "torn-line"
    assert path.read_bytes().endswith(b'{"body":{"run_')


def test_torn_line_refused_on_open_with_recovery_hint(tmp_path: Path) -> None:
    path = _make_log(tmp_path / "a.jsonl", n=3)
    good = path.read_bytes()
    path.write_bytes(good + b'{"body":{"run_')
    with pytest.raises(AuditError, match=r"incomplete line 5 .*head -n 4") as info:
        AuditLog(path, KEY, clock=fixed_clock())
    assert info.value.check == "torn-line"
    assert path.read_bytes().endswith(b'{"body":{"run_')  # never silently truncated


def test_open_refuses_broken_tail_and_second_writer(tmp_path: Path) -> None:
    path = _make_log(tmp_path / "a.jsonl", n=3)
    lines = _lines(path)
    _write(path, lines[:-2] + lines[-1:])
    with pytest.raises(AuditError, match="does not chain"):
        AuditLog(path, KEY)
    other = tmp_path / "b.jsonl"
    with AuditLog(other, KEY):
        with pytest.raises(AuditError, match="another process"):
            AuditLog(other, KEY)


def test_append_refuses_checkpoint_records_and_naive_clock(tmp_path: Path) -> None:
    from datetime import datetime

    with AuditLog(tmp_path / "a.jsonl", KEY, clock=datetime.now) as log:
        with pytest.raises(AuditError, match="naive"):
            log.append(R.join(run_id=RUN, round=0, site_id="a"))
        with pytest.raises(AuditError, match="checkpoint"):
            log.append(R.Record("log_checkpoint", {}))
        with pytest.raises(AuditError, match="nothing to checkpoint"):
            log.checkpoint()


# ---- keys ----

def test_keygen_mode_and_refusals(tmp_path: Path) -> None:
    priv, pub, kid = keygen(tmp_path / "keys")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = load_private_key(priv)
    assert key_id(key.public_key()) == kid and len(kid) == 16
    assert pub.read_bytes() == public_pem(key.public_key())
    with pytest.raises(AuditError, match="refusing to overwrite"):
        keygen(tmp_path / "keys")
    with pytest.raises(AuditError, match="refusing to overwrite"):
        save_private_key(key, priv)
    os.chmod(priv, 0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        load_private_key(priv)


# ---- CLI ----

def test_cli_keygen_verify_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    key = load_private_key(tmp_path / "k" / "audit-signing-key.pem")
    pem = str(tmp_path / "k" / "audit-public-key.pem")
    log = tmp_path / "a.jsonl"
    with AuditLog(log, key, clock=fixed_clock()) as a:
        a.append(_round(0))
        a.checkpoint()
        a.append(_round(1))
    assert main(["verify", str(log), "--public-key", pem]) == 8
    assert "unsigned-tail" in capsys.readouterr().err
    assert main(["verify", str(log), "--public-key", pem, "--allow-unsigned-tail"]) == 0
    assert capsys.readouterr().out.startswith("OK: 3 records")
    out = tmp_path / "r.md"
    assert main(["report", str(log), "--public-key", pem, "--allow-unsigned-tail", "--out", str(out)]) == 0
    assert "unsigned tail" in out.read_text()
    lines = _lines(log)
    _write(log, [lines[1], lines[0]] + lines[2:])
    assert main(["verify", str(log), "--public-key", pem, "--allow-unsigned-tail"]) == 8
    assert "line 1: sequence check failed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # cross-check needs a server log and a site log
        main(["cross-check", str(log)])
    assert exit_info.value.code == 2


# ---- committed samples ----

def test_samples_are_reproducible_and_verify_as_documented(tmp_path: Path) -> None:
    written = write_samples(tmp_path)
    committed = REPO / "audit" / "samples"
    for p in written:
        assert p.read_bytes() == (committed / p.name).read_bytes(), f"{p.name} differs; regenerate the samples"
    pem = str(committed / "samples-public-key.pem")
    assert main(["verify", str(committed / "good.jsonl"), "--public-key", pem]) == 0
    public = sample_key().public_key()
    keys = {key_id(public): public}
    for name, check in EXPECTED_FAILURES.items():
        _fails(committed / name, check, keys=keys)
        assert main(["verify", str(committed / name), "--public-key", pem]) == 8


def test_key_rotation_needs_every_public_key(tmp_path: Path) -> None:
    new = key_from_seed(bytes(range(1, 33)))
    path = _make_log(tmp_path / "a.jsonl", n=3)
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.key_rotation(run_id=RUN, old_key_id=log.key_id, new_key_id=key_id(new.public_key())))
        log.checkpoint()
    with AuditLog(path, new, clock=fixed_clock()) as log:
        log.append(_round(2))
        log.checkpoint()
    both = {**KEYS, key_id(new.public_key()): new.public_key()}
    assert verify_log(path, both).key_ids == sorted(both)
    assert _fails(path, "signature").line == len(_lines(path))

"""The verifier's fast path accepts exactly what the strict path accepts, and fails the same way.

``verify._parse`` checks a line with one decode, one re-encode and the generated copy-free
schema check ``records.conforms``; anything it does not accept goes through
``verify._parse_strict`` (the original parser, which names the failure). These tests pin that
the fast path never accepts more and never changes which check fails, on which line, with
which message.
"""

from __future__ import annotations

import base64
import copy
import gc
import json
from pathlib import Path
from typing import Any

import pytest

from fedbone_med.audit import records as R
from fedbone_med.audit import verify as V
from fedbone_med.audit.canonical import canonical_json, sha256_hex
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.keys import key_from_seed, key_id
from fedbone_med.audit.log import AuditLog, checkpoint_payload
from fedbone_med.audit.merkle import MerkleAccumulator
from fedbone_med.audit.samples import fixed_clock

KEY = key_from_seed(bytes(range(32)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
H = "ab" * 32
RUN = "run-test"
LEDGER = {"up": {"frames": 2, "bytes": 10, "digest": H, "types": {"forward": 2}},
          "down": {"frames": 1, "bytes": 4, "digest": "cd" * 32, "types": {"features": 1}}}


def _round(r: int) -> R.Record:
    sites = [R.SiteRound(site_id="site-a", steps=2, samples=16, epsilon=0.5, delta=1e-5, ledger=LEDGER,
                         train_loss=0.75),
             R.SiteRound(site_id="site-b", steps=2, samples=8, cert_fingerprint="sha256:00ff")]
    agg = R.AggregationSummary(method="projection", steps=2, conflicting_pairs_total=1, min_cosine=-0.1,
                               mean_cosine=0.2, mean_site_norms={"site-a": 1.0, "site-b": 2.5})
    return R.round_record(run_id=RUN, round=r, started_at="2026-01-01T00:00:00Z", ended_at="2026-01-01T00:01:00Z",
                          sites=sites, aggregation=agg, backbone_hash_before=H, backbone_hash_after=H,
                          checkpoint_hash=None, config_hash=H, software_version="0.1.0")


def _small_log(path: Path) -> Path:
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.run_start(run_id=RUN, config_hash=H, software_version="0.1.0", backbone_hash=H,
                               aggregation_method="projection", sites=["site-a", "site-b"], seed=1))
        log.append(_round(0))
        log.checkpoint()
        log.append(R.checkpoint_write(run_id=RUN, round=1, role="server", checkpoint_hash=H))
        log.append(_round(1))
        log.checkpoint()
    return path


def _outcome(path: Path, **kw: Any) -> tuple[str, int | None, str] | None:
    try:
        V.verify_log(path, KEYS, **kw)
    except AuditError as exc:
        return (exc.check or "", exc.line, str(exc))
    return None


def _strict_outcome(path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[str, int | None, str] | None:
    with monkeypatch.context() as m:
        m.setattr(V, "_parse", V._parse_strict)
        return _outcome(path, **kw)


def test_every_single_byte_edit_fails_exactly_as_the_strict_parser_says(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good = _small_log(tmp_path / "good.jsonl").read_bytes()
    assert _outcome(tmp_path / "good.jsonl") is None
    edited = tmp_path / "edited.jsonl"
    passed = []
    for i in range(len(good)):
        edited.write_bytes(good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:])
        fast = _outcome(edited)
        assert fast == _strict_outcome(edited, monkeypatch), f"byte {i}"
        if fast is None:
            passed.append(i)
    # every byte is covered: the last checkpoint signs its own time (signed_at) too
    assert passed == []


@pytest.mark.parametrize("edit, check, message", [
    (lambda env: env["body"]["sites"][0].__setitem__("epsilon", 10**400), "envelope", "finite number"),
    (lambda env: env["body"]["sites"][0].__setitem__("train_loss", 10**400), "envelope", "finite number"),
    (lambda env: env.__setitem__("kind", ["round"]), "envelope", "unknown record kind"),
    (lambda env: env.__setitem__("v", True), "envelope", "version-1"),
    (lambda env: env.__setitem__("v", 1.0), "envelope", "version-1"),
    (lambda env: env.__setitem__("seq", 1.0), "envelope", "version-1"),
    (lambda env: env["body"]["sites"][0].__setitem__("train_loss", "0.5"), "envelope", "finite number"),
    (lambda env: env["body"]["sites"][0]["ledger"]["up"]["types"].__setitem__("a/b", 1), "envelope", "file path"),
])
def test_odd_values_are_envelope_failures_not_crashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Any,
                                                      check: str, message: str) -> None:
    log = _small_log(tmp_path / "a.jsonl")
    lines = log.read_bytes().split(b"\n")[:-1]
    env = json.loads(lines[1])
    edit(env)
    lines[1] = canonical_json(env)
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    fast = _outcome(log)
    assert fast is not None and fast[:2] == (check, 2) and message in fast[2], fast
    assert fast == _strict_outcome(log, monkeypatch)


def _rechain(envs: list[dict[str, Any]]) -> bytes:
    """Lines for ``envs`` with seq/prev chained and every checkpoint re-signed, as a writer would produce."""
    tree, prev, out = MerkleAccumulator(), "0" * 64, []
    for n, env in enumerate(envs):
        env.update(seq=n, prev=prev)
        if env["kind"] == "log_checkpoint":
            b = env["body"]
            b.update(count=n, head=prev, merkle_root=tree.root().hex())
            payload = checkpoint_payload(n, prev, b["key_id"], b["run_id"], b["merkle_root"], b.get("signed_at"))
            b["signature"] = base64.b64encode(KEY.sign(payload)).decode()
        line = canonical_json(env)
        out.append(line)
        prev = sha256_hex(line)
        tree.add_line(line)
    return b"".join(line + b"\n" for line in out)


def test_an_integer_in_a_float_field_still_verifies(tmp_path: Path) -> None:
    """The fast path wants floats; validate also takes an integer there, and so does verification."""
    log = _small_log(tmp_path / "a.jsonl")
    envs = [json.loads(line) for line in log.read_bytes().split(b"\n")[:-1]]
    envs[1]["body"]["sites"][0]["epsilon"] = 2
    envs[1]["body"]["sites"][0]["train_loss"] = 1
    assert not R.conforms(R.KINDS["round"], envs[1]["body"])
    assert R.validate(R.KINDS["round"], envs[1]["body"], "round")["sites"][0]["epsilon"] == 2.0
    log.write_bytes(_rechain(envs))
    report = V.verify_log(log, KEYS)
    assert report.records[1]["body"]["sites"][0]["epsilon"] == 2
    envs[1]["body"]["sites"][0]["epsilon"] = 10**400  # ...but not one no float can hold
    log.write_bytes(_rechain(envs))
    assert _outcome(log) == ("envelope", 2, _outcome(log)[2]) and "finite number" in _outcome(log)[2]


_BAD_VALUES: list[Any] = [None, -1, 0, 1.5, True, "x", "a/b.png", "x" * 300, [], {}, float("nan"), 10**400, H]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [path] + [p for k, v in value.items() for p in _leaves(v, path + (k,))]
    if isinstance(value, list):
        return [path] + [p for i, v in enumerate(value) for p in _leaves(v, path + (i,))]
    return [path]


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = copy.deepcopy(value)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = new
    return out


def _validates(spec: Any, value: Any) -> bool:
    try:
        R.validate(spec, value, "x")
    except AuditError:
        return False
    return True


def _bodies() -> list[tuple[str, dict[str, Any]]]:
    lines = (Path(__file__).resolve().parents[1] / "audit" / "samples" / "good.jsonl").read_bytes().split(b"\n")[:-1]
    site = (Path(__file__).resolve().parents[1] / "audit" / "samples" / "site-01.jsonl").read_bytes()
    envs = [json.loads(line) for line in lines + site.split(b"\n")[:-1]]
    envs.append({"kind": "round", "body": json.loads(json.dumps(_round(0).body))})
    seen: dict[str, dict[str, Any]] = {}
    for env in envs:
        seen.setdefault(env["kind"], env["body"])
    return sorted(seen.items()) + [("round", envs[-1]["body"])]


def _variants(body: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(bad value or None, variant) pairs: every node replaced by each bad value; every field dropped; one added."""
    out: list[tuple[Any, Any]] = []
    for path in _leaves(body):
        out += [(bad, _set(body, path, bad)) for bad in _BAD_VALUES]
        node = body
        for k in path[:-1]:
            node = node[k]
        if path and isinstance(node, dict):
            smaller = {k: v for k, v in node.items() if k != path[-1]}
            out += [(None, _set(body, path[:-1], smaller)),
                    (None, _set(body, path[:-1], {**node, "unexpected_field": "x"}))]
    return out


@pytest.mark.parametrize("kind, body", _bodies())
def test_conforms_never_accepts_what_validate_refuses(kind: str, body: dict[str, Any]) -> None:
    spec = R.KINDS[kind]
    assert R.conforms(spec, body) and _validates(spec, body)
    refused = 0
    for bad, value in _variants(body):
        fast, slow = R.conforms(spec, value), _validates(spec, value)
        assert not fast or slow, (kind, value)
        if slow and not fast:  # only an integer where a float is expected takes the slow road and passes
            assert type(bad) is int and bad < 10**300, (kind, bad, value)
        refused += not slow
    assert refused > len(_leaves(body))  # the variants do break things


@pytest.mark.parametrize("enabled", [True, False])
def test_verification_restores_the_garbage_collector_state(tmp_path: Path, enabled: bool) -> None:
    log = _small_log(tmp_path / "a.jsonl")
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        V.verify_log(log, KEYS)
        assert gc.isenabled() is enabled
        lines = log.read_bytes().split(b"\n")
        log.write_bytes(b"\n".join(lines[:1] + lines[2:]))
        with pytest.raises(AuditError):
            V.verify_log(log, KEYS)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_verification_leaves_objects_frozen_by_the_process_frozen(tmp_path: Path) -> None:
    log = _small_log(tmp_path / "a.jsonl")
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        V.verify_log(log, KEYS)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()

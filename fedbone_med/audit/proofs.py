"""Self-contained Merkle proof bundles: one record, or one log extending another, without the whole log.

Protects the auditor who is given only an extract: a bundle carries the signed checkpoint
line(s) it relies on, so :func:`check_bundle` needs nothing but the signer's public key.

* **Inclusion** (``{"type": "inclusion", ...}``): one record's exact line, its index, the
  signed checkpoint whose ``merkle_root`` covers it, and the RFC 6962 audit path. Proves
  the record is, byte for byte, line ``index + 1`` of the log the key holder signed.
* **Consistency** (``{"type": "consistency", ...}``): two signed checkpoint lines (sizes
  ``m <= n``) and the RFC 6962 consistency proof. Proves the log signed at size ``n`` is the
  log signed at size ``m`` plus appended lines -- nothing before line ``m`` was rewritten or
  removed. Compare the old checkpoint with the copy you kept (count, head, merkle_root).

Bundles are JSON; hashes are lowercase hex. Errors raise :class:`AuditError` with check ``proof``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical_json
from .errors import AuditError
from .merkle import consistency_proof, inclusion_proof, leaf_hash, verify_consistency, verify_inclusion
from .records import KINDS, LOG_CHECKPOINT, validate
from .verify import VerifyReport, check_checkpoint_signature


def _fail(detail: str) -> AuditError:
    return AuditError(f"proof check failed: {detail}", check="proof")


def _lines(report: VerifyReport) -> list[bytes]:
    return [canonical_json(env) for env in report.records]  # verified canonical: these are the exact bytes


def _checkpoints(report: VerifyReport) -> list[int]:
    """1-based line numbers of checkpoints that carry a merkle_root."""
    return [e["seq"] + 1 for e in report.records if e["kind"] == LOG_CHECKPOINT and "merkle_root" in e["body"]]


def inclusion_bundle(report: VerifyReport, line: int, checkpoint_line: int | None = None) -> dict[str, Any]:
    """Proof that line ``line`` (1-based) of the verified log is covered by a signed checkpoint."""
    lines = _lines(report)
    if not 1 <= line <= len(lines):
        raise AuditError(f"no line {line}: the log has {len(lines)} lines", check="proof")
    candidates = [c for c in _checkpoints(report) if c > line]
    if checkpoint_line is None:
        if not candidates:
            raise AuditError(f"line {line} is not covered by a signed checkpoint with a merkle_root", check="proof")
        checkpoint_line = candidates[0]
    elif checkpoint_line not in candidates:
        raise AuditError(f"line {checkpoint_line} is not a checkpoint with a merkle_root after line {line}",
                         check="proof")
    size = report.records[checkpoint_line - 1]["body"]["count"]
    leaves = [leaf_hash(x) for x in lines[:size]]
    return {"type": "inclusion", "index": line - 1, "tree_size": size, "record": lines[line - 1].decode("utf-8"),
            "checkpoint": lines[checkpoint_line - 1].decode("utf-8"),
            "audit_path": [h.hex() for h in inclusion_proof(leaves, line - 1, size)]}


def consistency_bundle(report: VerifyReport, old_checkpoint_line: int,
                       new_checkpoint_line: int | None = None) -> dict[str, Any]:
    """Proof that the log signed at ``new_checkpoint_line`` extends the one signed at ``old_checkpoint_line``."""
    cps = _checkpoints(report)
    if not cps:
        raise AuditError("the log has no signed checkpoint with a merkle_root", check="proof")
    new_checkpoint_line = new_checkpoint_line or cps[-1]
    for c in (old_checkpoint_line, new_checkpoint_line):
        if c not in cps:
            raise AuditError(f"line {c} is not a signed checkpoint with a merkle_root", check="proof")
    old = report.records[old_checkpoint_line - 1]["body"]["count"]
    new = report.records[new_checkpoint_line - 1]["body"]["count"]
    if old > new:
        raise AuditError("the old checkpoint must not be after the new one", check="proof")
    lines = _lines(report)
    leaves = [leaf_hash(x) for x in lines[:new]]
    return {"type": "consistency", "old_checkpoint": lines[old_checkpoint_line - 1].decode("utf-8"),
            "new_checkpoint": lines[new_checkpoint_line - 1].decode("utf-8"),
            "proof": [h.hex() for h in consistency_proof(leaves, old, new)] if old else []}


def _checkpoint(text: Any, keys: Mapping[str, Ed25519PublicKey], what: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise _fail(f"{what} must be a checkpoint line (string)")
    try:
        env = json.loads(text)
        ok = isinstance(env, dict) and canonical_json(env) == text.encode("utf-8")
    except (ValueError, RecursionError, AuditError):
        ok = False
    if not ok or env.get("kind") != LOG_CHECKPOINT:
        raise _fail(f"{what} is not a canonical log_checkpoint line")
    try:
        body: dict[str, Any] = validate(KINDS[LOG_CHECKPOINT], env.get("body"), what)
    except AuditError as exc:
        raise _fail(str(exc)) from None
    if "merkle_root" not in body:
        raise _fail(f"{what} carries no merkle_root (written before Merkle roots were signed)")
    try:
        check_checkpoint_signature(body, keys)
    except AuditError as exc:
        raise _fail(f"{what}: {exc}") from None
    return body


def _hashes(value: Any, what: str) -> list[bytes]:
    try:
        out = [bytes.fromhex(h) for h in value]
    except (TypeError, ValueError):
        raise _fail(f"{what} must be a list of hex hashes") from None
    if any(len(h) != 32 for h in out):
        raise _fail(f"{what} must hold 32-byte hashes")
    return out


def check_bundle(bundle: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Check a bundle against the signer's public key(s); return a one-line description or raise."""
    kind = bundle.get("type")
    if kind == "inclusion":
        cp = _checkpoint(bundle.get("checkpoint"), keys, "checkpoint")
        record, index = bundle.get("record"), bundle.get("index")
        if not isinstance(record, str) or not isinstance(index, int) or isinstance(index, bool):
            raise _fail("inclusion bundle needs 'record' (string) and 'index' (integer)")
        if bundle.get("tree_size") != cp["count"]:
            raise _fail("tree_size differs from the signed checkpoint's count")
        try:
            seq = json.loads(record).get("seq")
        except (ValueError, RecursionError, AttributeError):
            seq = None
        if seq != index:
            raise _fail(f"the record's seq {seq} is not its claimed index {index}")
        path = _hashes(bundle.get("audit_path"), "audit_path")
        if not verify_inclusion(leaf_hash(record.encode("utf-8")), index, cp["count"], path,
                                bytes.fromhex(cp["merkle_root"])):
            raise _fail(f"record at index {index} is not in the tree signed at count {cp['count']} "
                        "(the record or the path was altered)")
        return (f"OK: line {index + 1} is included in the log signed by key {cp['key_id']} at count {cp['count']} "
                f"(merkle_root {cp['merkle_root']})")
    if kind == "consistency":
        old = _checkpoint(bundle.get("old_checkpoint"), keys, "old_checkpoint")
        new = _checkpoint(bundle.get("new_checkpoint"), keys, "new_checkpoint")
        proof = _hashes(bundle.get("proof"), "proof")
        if not verify_consistency(old["count"], new["count"], bytes.fromhex(old["merkle_root"]),
                                  bytes.fromhex(new["merkle_root"]), proof):
            raise _fail(f"the log signed at count {new['count']} does not extend the log signed at count "
                        f"{old['count']} (rewritten or truncated history, or an altered proof)")
        return (f"OK: the log signed at count {new['count']} (merkle_root {new['merkle_root']}) extends the log "
                f"signed at count {old['count']} (head {old['head']}, merkle_root {old['merkle_root']})")
    raise _fail("unknown bundle type (expected 'inclusion' or 'consistency')")

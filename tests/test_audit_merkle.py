"""RFC 6962 Merkle tree over the audit log: known answers, proofs, signed roots, proof bundles, CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from fedbone_med.audit import records as R
from fedbone_med.audit.canonical import canonical_json
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.keys import key_from_seed, key_id, save_public_key
from fedbone_med.audit.log import AuditLog, checkpoint_payload
from fedbone_med.audit.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from fedbone_med.audit.proofs import check_bundle, consistency_bundle, inclusion_bundle
from fedbone_med.audit.samples import fixed_clock
from fedbone_med.audit.verify import verify_log
from fedbone_med.cli.audit import main

KEY = key_from_seed(bytes(range(32)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
RUN = "run-m"

# Certificate Transparency's reference test vectors (RFC 6962 tree hashes of these 8 leaves).
CT_LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43", bytes(range(0x50, 0x58)),
             bytes(range(0x60, 0x70))]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_tree_hash_known_answers() -> None:
    leaves = [leaf_hash(x) for x in CT_LEAVES]
    assert [tree_root(leaves[:n]).hex() for n in range(1, 9)] == CT_ROOTS
    assert tree_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_every_proof_verifies_and_any_change_fails() -> None:
    for n in range(1, 34):
        leaves = [leaf_hash(bytes([i])) for i in range(n)]
        root = tree_root(leaves)
        for i in range(n):
            path = inclusion_proof(leaves, i)
            assert verify_inclusion(leaves[i], i, n, path, root)
            assert not verify_inclusion(leaf_hash(b"other"), i, n, path, root)
            if i ^ 1 < n:  # the same path claimed for the neighbouring position
                assert not verify_inclusion(leaves[i], i ^ 1, n, path, root)
            assert not verify_inclusion(leaves[i], n, n, path, root)
            if path:
                assert not verify_inclusion(leaves[i], i, n, path[:-1], root)
                bad = [node_hash(path[0], path[0])] + path[1:]
                assert not verify_inclusion(leaves[i], i, n, bad, root)
        for m in range(1, n + 1):
            old = tree_root(leaves[:m])
            proof = consistency_proof(leaves, m)
            assert verify_consistency(m, n, old, root, proof)
            if m < n:
                assert not verify_consistency(m, n, leaf_hash(b"x"), root, proof)
                assert not verify_consistency(m, n, old, leaf_hash(b"x"), proof)
                assert not verify_consistency(m, n, old, root, proof[:-1])
                rewritten = leaves[:m - 1] + [leaf_hash(b"rewritten")] + leaves[m:]
                assert not verify_consistency(m, n, old, tree_root(rewritten), consistency_proof(rewritten, m))


def _log(path: Path, rounds: int = 6, every: int = 2) -> Path:
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.run_start(run_id=RUN, config_hash="ab" * 32, software_version="0.1.0",
                               backbone_hash="ab" * 32, aggregation_method="mean", sites=["s1"]))
        for r in range(rounds):
            log.append(R.join(run_id=RUN, round=r, site_id=f"s{r}"))
            if (r + 1) % every == 0:
                log.checkpoint()
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def test_checkpoints_sign_the_tree_hash_of_the_lines_before_them(tmp_path: Path) -> None:
    path = _log(tmp_path / "a.jsonl")
    lines = _lines(path)
    n_roots = 0
    for i, line in enumerate(lines):
        env = json.loads(line)
        if env["kind"] == "log_checkpoint":
            assert env["body"]["merkle_root"] == tree_root([leaf_hash(x) for x in lines[:i]]).hex()
            n_roots += 1
    assert n_roots == 3
    # reopening rebuilds the tree: the next root is the same as if written in one go
    with AuditLog(path, KEY, clock=fixed_clock()) as log:
        log.append(R.join(run_id=RUN, round=9, site_id="s9"))
        log.checkpoint()
    lines = _lines(path)
    assert json.loads(lines[-1])["body"]["merkle_root"] == tree_root([leaf_hash(x) for x in lines[:-1]]).hex()
    assert verify_log(path, KEYS).signed_checkpoints == 4


def _resign(env: dict[str, Any]) -> bytes:
    b = env["body"]
    payload = checkpoint_payload(b["count"], b["head"], b["key_id"], b["run_id"], b.get("merkle_root"),
                                 b.get("signed_at"))
    b["signature"] = base64.b64encode(KEY.sign(payload)).decode()
    return canonical_json(env)


def test_wrong_signed_root_fails_merkle_check_and_old_checkpoints_still_verify(tmp_path: Path) -> None:
    path = _log(tmp_path / "a.jsonl", rounds=2, every=2)
    lines = _lines(path)
    env = json.loads(lines[-1])
    # an unsigned change of the root breaks the signature
    env["body"]["merkle_root"] = "00" * 32
    path.write_bytes(b"".join(x + b"\n" for x in lines[:-1] + [canonical_json(env)]))
    with pytest.raises(AuditError) as info:
        verify_log(path, KEYS)
    assert info.value.check == "signature"
    # a key holder signing a wrong root is caught by recomputation
    path.write_bytes(b"".join(x + b"\n" for x in lines[:-1] + [_resign(env)]))
    with pytest.raises(AuditError) as info:
        verify_log(path, KEYS)
    assert info.value.check == "merkle" and info.value.line == len(lines)
    # a checkpoint written before merkle roots and signed times existed (no fields, old payload) verifies
    del env["body"]["merkle_root"]
    del env["body"]["signed_at"]
    path.write_bytes(b"".join(x + b"\n" for x in lines[:-1] + [_resign(env)]))
    assert verify_log(path, KEYS).signed_checkpoints == 1


def test_bundles_prove_inclusion_and_consistency_with_the_key_only(tmp_path: Path) -> None:
    path = _log(tmp_path / "a.jsonl")
    report = verify_log(path, KEYS)
    for line in range(1, report.count):
        if report.records[line - 1]["kind"] == "log_checkpoint" and line == report.count:
            continue
        bundle = inclusion_bundle(report, line)
        assert check_bundle(json.loads(json.dumps(bundle)), KEYS).startswith(f"OK: line {line} is included")
    bundle = inclusion_bundle(report, 3)
    forged = {**bundle, "record": bundle["record"].replace('"s1"', '"s7"')}
    with pytest.raises(AuditError, match="not in the tree"):
        check_bundle(forged, KEYS)
    with pytest.raises(AuditError, match="not its claimed index"):
        check_bundle({**bundle, "index": 4}, KEYS)
    with pytest.raises(AuditError, match="unknown key_id"):
        check_bundle(bundle, {"0" * 16: KEY.public_key()})
    with pytest.raises(AuditError, match="not covered"):
        inclusion_bundle(report, report.count)  # the last checkpoint covers only the lines before it
    checkpoints = [e["seq"] + 1 for e in report.records if e["kind"] == "log_checkpoint"]
    cons = consistency_bundle(report, checkpoints[0])
    assert check_bundle(cons, KEYS).startswith("OK: the log signed at count")
    # a rewritten history, signed by the same key, does not extend the checkpoint kept from the original
    other = tmp_path / "b.jsonl"
    with AuditLog(other, KEY, clock=fixed_clock()) as log:
        log.append(R.run_start(run_id=RUN, config_hash="cd" * 32, software_version="0.1.0",
                               backbone_hash="ab" * 32, aggregation_method="mean", sites=["s1"]))
        for r in range(6):
            log.append(R.join(run_id=RUN, round=r, site_id=f"s{r}"))
        log.checkpoint()
    rewritten = consistency_bundle(verify_log(other, KEYS), 8)
    spliced = {**rewritten, "old_checkpoint": cons["old_checkpoint"]}
    with pytest.raises(AuditError, match="does not extend"):
        check_bundle(spliced, KEYS)


def test_cli_prove_and_check_proof(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(tmp_path / "a.jsonl")
    pem = tmp_path / "pub.pem"
    save_public_key(KEY.public_key(), pem)
    proof = tmp_path / "p.json"
    assert main(["prove", str(path), "--public-key", str(pem), "--record", "2", "--out", str(proof)]) == 0
    assert main(["check-proof", str(proof), "--public-key", str(pem)]) == 0
    assert "OK: line 2 is included" in capsys.readouterr().out
    data = json.loads(proof.read_text())
    data["audit_path"][0] = "00" * 32
    proof.write_text(json.dumps(data))
    assert main(["check-proof", str(proof), "--public-key", str(pem)]) == 8
    assert "proof check failed" in capsys.readouterr().err
    assert main(["prove", str(path), "--public-key", str(pem), "--consistency", "4", "--out", str(proof)]) == 0
    assert main(["check-proof", str(proof), "--public-key", str(pem)]) == 0
    assert main(["prove", str(path), "--public-key", str(pem), "--consistency", "2"]) == 8  # not a checkpoint

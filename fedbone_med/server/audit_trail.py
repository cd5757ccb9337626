"""The server's audit trail: one signed, hash-chained record per training round, plus events.

Wraps :class:`fedbone_med.audit.AuditLog` with what the coordinator knows: which sites
took part, how many steps and samples each contributed, the aggregation statistics, the
backbone's hash before and after the round, the hash of the checkpoint written and, per
site, the frame-ledger summary of what was exchanged (for ``fedbone-audit cross-check``).
It records identifiers, counts, hashes and statistics only (see ``audit/GUIDE.md``).

The signing key is the server's Ed25519 key (private key file mode 0600); auditors verify
with the public key beside it: ``fedbone-audit verify LOG --public-key PUB``.

API and where to call it (all methods append fsync'd records; ``round_finished``,
``start``, ``reconcile``, ``rotate_key`` and ``sign`` also append a signed checkpoint):

* ``start(backbone, aggregation, sites, seed, round)`` -- fresh run only;
* ``resume(next_round, checkpoint, checkpoint_hash, backbone_hash=, step=, key_dir=)`` -- on
  ``--resume``, right after loading the server checkpoint and *before* anything else is appended:
  verifies the whole log with the server's public keys (refused: AuditError naming the check), checks
  the checkpoint file against the hash the log recorded for it (refused: CheckpointError), back-fills
  the crash window (``reconcile``) and writes ``round_interrupted`` (the restart, with the checkpoint
  and backbone it starts from; the interrupted attempt's frames are not booked);
* ``reconcile(next_round, checkpoint_hash, backbone_hash=None, step=None)`` -- the back-fill alone
  (``resume`` calls it): ``round_backfill`` records for rounds the checkpoint holds but the log lacks;
* ``site_joined(site, round, cert_fingerprint=None)`` -- a site's Join accepted (its
  fingerprint then fills ``cert_fingerprint`` in that site's round entries);
* ``site_left(site, round, reason)`` -- orderly Leave; ``site_dropped(site, round, reason)``
  -- a site timed out, failed validation or was disconnected;
* ``step_skipped(round, step, reason, sites)`` -- a step aggregated nothing (deadline without
  ``min_sites``, non-finite gradient, ...); ``sites`` = the sites whose slots were missing/refused;
* ``config_changed(round, before, after, changed_keys)``, ``site_revoked(site, reason,
  cert_fingerprint=None)``, ``rotate_key(new_key_path)``;
* ``checkpoint_written(round, role, hash)`` -- checkpoints *other than* the per-round server
  checkpoint, which ``round_finished`` records itself;
* ``round_started(backbone)`` / ``round_finished(round, backbone, usage, steps, method,
  checkpoint_hash, privacy=None, *, ledgers=None, losses=None)`` -- ``ledgers`` is
  ``LedgerBook.take_round(round)``: ``{site: FrameLedger summary}``; ``losses`` is
  ``{site: mean training loss of the round}`` as each site reported it (``train_loss``);
* ``run_finished(rounds, backbone, checkpoint_hash, ledgers)`` -- once, when every round is complete and
  the sites have left: the ``run_end`` record with ``LedgerBook.take_round(rounds)`` (what each site
  exchanged after the last round closed: the last report's reply, the last sync, the last validation);
* ``sign()`` -- a signed checkpoint now (e.g. at shutdown after events); ``close()``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from .. import __version__
from ..audit import AggregationSummary, AuditLog, SiteRound, iso_utc, records
from ..audit.errors import AuditError
from ..audit.keys import generate_key, key_id, load_private_key, load_public_keys, save_private_key, save_public_key
from ..audit.log import backfill_reason, last_round, rounds_to_backfill
from ..audit.records import SERVER_ROUND_KINDS, Clock, utc_now
from ..audit.verify import VerifyReport, verify_log
from ..errors import CheckpointError


def module_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes and bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def install_rotated_key(key_dir: str | Path, new_key_path: str | Path, old_key_id: str) -> Path:
    """After :meth:`ServerAuditTrail.rotate_key`: the new key becomes ``key_dir``'s current key.

    The old key pair moves to ``key_dir/retired/<old key id>.pem`` (and ``.pub.pem``), never deleted: an
    auditor needs the old public key to verify the records it signed.
    """
    key_dir = Path(key_dir)
    retired = key_dir / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    current, public = key_dir / "server-audit-key.pem", key_dir / "server-audit-key.pub.pem"
    os.replace(current, retired / f"{old_key_id}.pem")
    if public.exists():
        os.replace(public, retired / f"{old_key_id}.pub.pem")
    new_key = load_private_key(new_key_path)
    save_private_key(new_key, current)
    save_public_key(new_key.public_key(), public)
    return current


def ensure_server_key(key_dir: str | Path) -> Path:
    """The server's audit signing key in ``key_dir`` (created with its public key if absent)."""
    key_dir = Path(key_dir)
    private = key_dir / "server-audit-key.pem"
    if not private.exists():
        key_dir.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        save_private_key(key, private)
        save_public_key(key.public_key(), key_dir / "server-audit-key.pub.pem")
    return private


F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    """Serialise trail methods: the coordinator calls them from transport threads and the round loop."""

    @functools.wraps(fn)
    def wrapper(self: ServerAuditTrail, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return cast(F, wrapper)


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)  # also accepts a 0-d tensor or numpy scalar
    return x if math.isfinite(x) else None


class ServerAuditTrail:
    """Round records and events for one run, written by the process that owns the backbone (thread-safe)."""

    def __init__(self, log_path: str | Path, key_path: str | Path, *, run_id: str, config_hash: str,
                 clock: Clock = utc_now) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self.log = AuditLog(log_path, load_private_key(key_path), clock=clock)
        self.run_id, self.config_hash = run_id, config_hash
        self._round_start: tuple[str, str] | None = None
        self._fingerprints: dict[str, str | None] = {}

    @_locked
    def start(self, backbone: nn.Module, aggregation: str, sites: list[str], seed: int, round: int, *,
              joins: bool = True) -> None:
        """``sites``: the sites expected; ``joins=False`` when their joins are recorded as they happen."""
        self.log.append(records.run_start(
            run_id=self.run_id, config_hash=self.config_hash, software_version=__version__,
            backbone_hash=module_hash(backbone), aggregation_method=aggregation, sites=sites, seed=seed,
        ))
        for site in sites if joins else ():
            self.log.append(records.join(run_id=self.run_id, round=round, site_id=site))
        self.log.checkpoint(run_id=self.run_id)

    # -- events ----------------------------------------------------------------------
    @_locked
    def site_joined(self, site: str, round: int, cert_fingerprint: str | None = None) -> None:
        self._fingerprints[site] = cert_fingerprint
        self.log.append(records.join(run_id=self.run_id, round=round, site_id=site,
                                     cert_fingerprint=cert_fingerprint))

    @_locked
    def site_left(self, site: str, round: int, reason: str) -> None:
        self.log.append(records.leave(run_id=self.run_id, round=round, site_id=site, reason=reason))

    @_locked
    def site_dropped(self, site: str, round: int, reason: str) -> None:
        self.log.append(records.dropout(run_id=self.run_id, round=round, site_id=site, reason=reason))

    @_locked
    def step_skipped(self, round: int, step: int, reason: str, sites: Sequence[str]) -> None:
        self.log.append(records.step_skipped(run_id=self.run_id, round=round, step=step, reason=reason,
                                             sites=sorted(sites)))

    @_locked
    def checkpoint_written(self, round: int, role: str, hash: str) -> None:
        self.log.append(records.checkpoint_write(run_id=self.run_id, round=round, role=role, checkpoint_hash=hash))

    @_locked
    def config_changed(self, round: int, before: str, after: str, changed_keys: Sequence[str]) -> None:
        self.log.append(records.config_change(run_id=self.run_id, round=round, config_hash_before=before,
                                              config_hash_after=after, changed_keys=sorted(changed_keys)))
        self.config_hash = after

    @_locked
    def site_revoked(self, site: str, reason: str, cert_fingerprint: str | None = None) -> None:
        self.log.append(records.revocation(run_id=self.run_id, site_id=site, reason=reason,
                                           cert_fingerprint=cert_fingerprint))

    @_locked
    def rotate_key(self, new_key_path: str | Path) -> str:
        """Switch to a new signing key: the rotation is recorded and signed by the *old* key; returns the new key id.

        Auditors then need both public keys (``--public-key old.pem --public-key new.pem``).
        """
        new_key = load_private_key(new_key_path)
        new_id = key_id(new_key.public_key())
        path = self.log.path
        self.log.append(records.key_rotation(run_id=self.run_id, old_key_id=self.log.key_id, new_key_id=new_id))
        self.log.checkpoint(run_id=self.run_id)
        self.log.close()
        self.log = AuditLog(path, new_key, clock=self._clock)
        return new_id

    @_locked
    def sign(self) -> None:
        """Append a signed checkpoint if any record is not yet covered by one."""
        if not self.log.signed:
            self.log.checkpoint(run_id=self.run_id)

    @_locked
    def reconcile(self, next_round: int, checkpoint_hash: str, *, backbone_hash: str | None = None,
                  step: int | None = None) -> list[int]:
        """Close the crash window between the server checkpoint and the round record; return rounds back-filled.

        Call on resume after loading the checkpoint: ``next_round`` = the checkpoint's ``round``
        (rounds completed), ``checkpoint_hash`` = SHA-256 of the checkpoint file, optionally
        ``backbone_hash`` = ``module_hash(backbone)`` after loading and ``step`` = its global
        step. Every round < ``next_round`` without a ``round``/``round_backfill`` record for
        this run gets a ``round_backfill`` record (flagged recovered; per-site data is lost);
        the checkpoint and backbone hashes go on the last one. Existing lines are never
        rewritten; records left unsigned by the crash are covered by a new signed checkpoint.
        Raises AuditError (check ``reconcile``) if the log is ahead of the checkpoint.
        """
        last = last_round(self.log.path, self.run_id, SERVER_ROUND_KINDS)
        missing = rounds_to_backfill(last, next_round, self.log.path)
        for r in missing:
            latest = r == next_round - 1
            self.log.append(records.round_backfill(
                run_id=self.run_id, round=r, reason=backfill_reason(r, next_round), log_last_round=last,
                checkpoint_hash=checkpoint_hash if latest else None,
                backbone_hash=backbone_hash if latest else None, step=step if latest else None))
        self.sign()
        return missing

    @_locked
    def resume(self, next_round: int, checkpoint: str | Path, checkpoint_hash: str, *, backbone_hash: str,
               step: int | None = None, key_dir: str | Path | None = None) -> list[int]:
        """Continue this run's log after a restart; return the rounds back-filled (see :meth:`reconcile`).

        ``next_round`` = the loaded checkpoint's ``round``; ``checkpoint`` its path and
        ``checkpoint_hash`` its SHA-256; ``backbone_hash`` = ``module_hash(backbone)`` after loading;
        ``key_dir``: the server's key directory, whose ``retired/*.pub.pem`` (keys rotated out) verify
        older checkpoints of the log. Before anything is appended:

        1. the whole log verifies (hash chain, every signature, rounds, backbone continuity) with the
           signing key's own public key and the retired ones; it has a signed checkpoint, a
           ``run_start`` for this run, and after its last signed checkpoint no more than a crash between
           a round record and its signature leaves (events, at most one ``round``, back-fills). Otherwise
           AuditError naming the check: signing over a re-chained log would vouch for it;
        2. the checkpoint is the one the log recorded last for this run (``round`` / ``round_backfill`` /
           ``round_interrupted``), or exactly one round ahead of the log's last round (the crash window
           between the checkpoint write and the round record, which is then back-filled). Otherwise
           CheckpointError naming both hashes and the path.

        Then the crash window is back-filled and a signed ``round_interrupted`` record says that round
        ``next_round`` restarts from this checkpoint and backbone and that the interrupted attempt's
        frames (in memory only) are not booked.
        """
        report = self._verify_for_resume(key_dir)
        self._check_checkpoint(report, next_round, Path(checkpoint), checkpoint_hash)
        missing = self.reconcile(next_round, checkpoint_hash, backbone_hash=backbone_hash, step=step)
        self.log.append(records.round_interrupted(
            run_id=self.run_id, round=next_round, step=step, checkpoint_hash=checkpoint_hash,
            backbone_hash=backbone_hash,
            reason="the server restarted from its checkpoint; the frames of the interrupted attempt (ledger rounds "
                   f"{next_round} and {next_round + 1} before the restart) are in no server record"))
        self.log.checkpoint(run_id=self.run_id)
        return missing

    def _verify_for_resume(self, key_dir: str | Path | None) -> VerifyReport:
        path = self.log.path
        keys = {self.log.key_id: self.log.public_key}
        retired: list[str | Path] = []
        if key_dir is not None:
            retired += sorted((Path(key_dir) / "retired").glob("*.pub.pem"))
        if retired:
            keys = {**load_public_keys(retired), **keys}
        advice = (f"Keep {path} unchanged as evidence; restore the log from a backup (or compare it with the sites' "
                  "own logs), or start a new run in a new output directory")
        if not path.stat().st_size:
            raise AuditError(f"--resume: the audit log {path} is missing or empty, but the checkpoint belongs to run "
                             f"{self.run_id}, which wrote one: a resumed run only extends the log of its first "
                             f"launch. {advice}", check="empty", line=0)
        try:
            report = verify_log(path, keys, require_complete=False)
        except AuditError as exc:
            raise AuditError(f"--resume: the audit log fails verification, so it will not be extended and signed "
                             f"over: {exc}. {advice}", check=exc.check, line=exc.line) from None
        if not report.signed_checkpoints:
            raise AuditError(f"--resume: the audit log {path} has no signed checkpoint (every launch signs one at "
                             "its start): its checkpoints were removed and the chain rebuilt, or it is not this "
                             f"server's log. {advice}", check="unsigned-tail", line=1)
        if not any(e["kind"] == "run_start" and e["body"]["run_id"] == self.run_id for e in report.records):
            raise AuditError(f"--resume: the audit log {path} has no run_start record for run {self.run_id} (the "
                             f"checkpoint's run). {advice}", check="resume")
        tail = report.records[report.count - report.unsigned_tail:]
        kinds = [e["kind"] for e in tail]
        bad = sorted({k for k in kinds if k in ("run_start", "run_end", "key_rotation")})
        if bad or kinds.count("round") > 1:
            what = (f"{', '.join(bad)} record(s)" if bad else f"{kinds.count('round')} round records")
            first = report.count - report.unsigned_tail + 1
            raise AuditError(f"--resume: the audit log {path} holds {what} after its last signed checkpoint (lines "
                             f"{first}..{report.count}): more than a crash between a round record and its signature "
                             "leaves unsigned, as when signed checkpoints were removed and the chain rebuilt. "
                             f"Refusing to sign over them. {advice}", check="unsigned-tail", line=first)
        return report

    def _check_checkpoint(self, report: VerifyReport, next_round: int, checkpoint: Path, actual: str) -> None:
        last: int | None = None
        recorded: tuple[str, int, str] | None = None  # (hash, line, what) of the last checkpoint the log names
        for e in report.records:
            b = e["body"]
            if b["run_id"] != self.run_id:
                continue
            if e["kind"] in (*SERVER_ROUND_KINDS, "round_interrupted"):
                last = b["round"] if e["kind"] in SERVER_ROUND_KINDS else last
                what = f"round {b['round']}" if e["kind"] == "round" else f"{e['kind']} of round {b['round']}"
                digest = b["checkpoint_hash"]
                recorded = (digest, e["seq"] + 1, what) if digest is not None else None
        expected = 0 if last is None else last + 1
        if next_round == expected + 1:
            return  # the crash window: the checkpoint of round `expected` was written, its record was not
        if next_round > expected + 1:
            raise CheckpointError(
                f"--resume: the server checkpoint {checkpoint} has completed {next_round} round(s), but the audit log "
                f"{self.log.path} records rounds up to {last}: more than the one round a crash between a checkpoint "
                "and its round record can leave unrecorded. Refusing to back-fill rounds the log never saw; restore "
                "the checkpoint that matches the log (a backup), or start a new run")
        if next_round < expected or recorded is None:
            return  # a log ahead of the checkpoint is refused by reconcile; no recorded hash: nothing to compare
        digest, line, what = recorded
        if digest != actual:
            raise CheckpointError(
                f"--resume: the server checkpoint {checkpoint} has SHA-256 {actual}, but the signed audit log "
                f"{self.log.path} recorded {digest} for it ({what}, line {line}): the checkpoint was modified or "
                "replaced after it was written. Refusing to resume from it. Keep both files as evidence; restore "
                "the checkpoint the log recorded (e.g. from a backup), or start a new run in a new output directory")

    # -- rounds ----------------------------------------------------------------------
    @_locked
    def round_started(self, backbone: nn.Module) -> None:
        self._round_start = (iso_utc(self._clock()), module_hash(backbone))

    @_locked
    def round_finished(self, round: int, backbone: nn.Module, usage: dict[str, tuple[int, int]],
                       steps: list[dict[str, Any]], method: str, checkpoint_hash: str,
                       privacy: dict[str, tuple[float | None, float | None]] | None = None, *,
                       ledgers: Mapping[str, Mapping[str, Any]] | None = None,
                       losses: Mapping[str, float] | None = None) -> None:
        """``privacy``: site -> (epsilon, delta) spent so far, as the site reported it.

        ``ledgers``: site -> frame-ledger summary of the round (``LedgerBook.take_round``).
        A site with a ledger but no usage (it exchanged frames but completed no step) is
        listed with 0 steps and 0 samples, so every exchange is accounted for.

        ``losses``: site -> the site's mean training loss over its steps of this round, as the
        site reported it; written as ``train_loss`` in that site's entry. Sites without one, and
        non-finite values (NaN, inf: the schema allows finite numbers only), get no ``train_loss``;
        a loss for a site that is not otherwise in the round is ignored.
        """
        started, before = self._round_start or (iso_utc(self._clock()), module_hash(backbone))
        cosines_min = [s["min_cosine"] for s in steps if s.get("min_cosine") is not None]
        cosines_mean = [s["mean_cosine"] for s in steps if s.get("mean_cosine") is not None]
        norms: dict[str, list[float]] = {}
        for s in steps:
            for name, norm in zip(s.get("site_names") or [], s.get("site_norms") or [], strict=True):
                norms.setdefault(name, []).append(float(norm))
        summary = AggregationSummary(
            method=method,
            steps=len(steps),
            conflicting_pairs_total=sum(int(s.get("conflicting_pairs", 0)) for s in steps),
            min_cosine=min(cosines_min) if cosines_min else None,
            mean_cosine=sum(cosines_mean) / len(cosines_mean) if cosines_mean else None,
            mean_site_norms={k: sum(v) / len(v) for k, v in sorted(norms.items())},
        )
        privacy = privacy or {}
        ledgers = ledgers or {}
        losses = losses or {}
        counts = {**{name: (0, 0) for name in ledgers}, **usage}
        sites = [SiteRound(site_id=name, steps=n_steps, samples=n_samples,
                           epsilon=_finite(privacy.get(name, (None, None))[0]),
                           delta=_finite(privacy.get(name, (None, None))[1]),
                           cert_fingerprint=self._fingerprints.get(name),
                           ledger=ledgers.get(name), train_loss=_finite(losses.get(name)))
                 for name, (n_steps, n_samples) in sorted(counts.items())]
        self.log.append(records.checkpoint_write(
            run_id=self.run_id, round=round, role="server", checkpoint_hash=checkpoint_hash))
        self.log.append(records.round_record(
            run_id=self.run_id, round=round, started_at=started, ended_at=iso_utc(self._clock()), sites=sites,
            aggregation=summary, backbone_hash_before=before, backbone_hash_after=module_hash(backbone),
            checkpoint_hash=checkpoint_hash, config_hash=self.config_hash, software_version=__version__,
        ))
        self.log.checkpoint(run_id=self.run_id)
        self._round_start = None

    @_locked
    def run_finished(self, rounds: int, backbone: nn.Module, checkpoint_hash: str | None,
                     ledgers: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Close the run: ``rounds`` rounds complete; ``ledgers`` = ``LedgerBook.take_round(rounds)``.

        Without this record the frames exchanged after the last round record (booked under round
        ``rounds`` by both ends, see ``transport.wire.ledger_tags``) would be in no record at all.
        """
        self.log.append(records.run_end(run_id=self.run_id, rounds=rounds, sites=dict(ledgers or {}),
                                        backbone_hash=module_hash(backbone), checkpoint_hash=checkpoint_hash))
        self.log.checkpoint(run_id=self.run_id)

    @_locked
    def close(self) -> None:
        self.log.close()

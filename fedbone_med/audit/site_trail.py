"""The site's own audit trail: a signed, hash-chained log of what the site exchanged per round.

Protects a hospital against having to take the server's word for what happened: the site
keeps its own log (same format and verifier as the server's, :class:`~.log.AuditLog`),
signed with the *site's* Ed25519 key, recording per round its steps, samples, ε/δ spent and
the :mod:`~.ledger` summary of every frame it sent and received. ``fedbone-audit
cross-check SERVER_LOG SITE_LOG`` then shows both sides agree, round by round.

Records (see ``audit/schema.json``): ``site_run_start`` once per launch, ``site_round`` once
per round followed by a signed ``log_checkpoint``, ``leave`` when the site stops early,
``site_round_interrupted`` when it abandons an exchange to join again (what it had booked),
``site_run_end`` once the last round is complete (what was exchanged after it), and
``site_round_backfill`` written by :meth:`SiteAuditTrail.reconcile` after a crash between
the site checkpoint and the round record. Never patient data: identifiers, counts, hashes.

Wiring (site runtime)::

    trail = SiteAuditTrail(out / "audit" / f"site-{name}.jsonl", key_path, run_id=run_id, site_id=name)
    trail.reconcile(next_round=ckpt["round"], checkpoint_hash=file_sha256(ckpt_path))  # on resume only
    trail.start(round=first_round, config_hash=..., cert_fingerprint=..., server_fingerprint=...)
    ... every frame: ledger.record("up"|"down", msg_type, round, step, frame_bytes)
    trail.round_finished(round, steps=..., samples=..., ledger=ledger.take(round),
                         epsilon=..., delta=..., checkpoint_hash=...)
    trail.run_finished(rounds, ledger=ledger.take(rounds))  # after the last round, before Leave
    trail.left(round, reason); trail.close()
    # after a failure, once joined again and before the ledger is replaced:
    trail.attempt_abandoned(round, admitted, ledger, reported, cause=exc.code)

``ensure_site_key(key_dir, site_id)`` creates the site's key pair (private 0600) if absent; the
site gives ``site-<id>-audit-key.pub.pem`` to its auditor.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import __version__
from . import records
from .errors import AuditError
from .keys import generate_key, load_private_key, save_private_key, save_public_key
from .ledger import FrameLedger
from .log import AuditLog, backfill_reason, rounds_to_backfill, run_records
from .records import Clock, utc_now


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else float(x)


def ensure_site_key(key_dir: str | Path, site_id: str) -> Path:
    """The site's audit signing key in ``key_dir`` (created with its public key if absent)."""
    records.check_string(site_id, "site_id")
    key_dir = Path(key_dir)
    private = key_dir / f"site-{site_id}-audit-key.pem"
    if not private.exists():
        key_dir.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        save_private_key(key, private)
        save_public_key(key.public_key(), key_dir / f"site-{site_id}-audit-key.pub.pem")
    return private


def _site_log_state(path: Path, run_id: str, site_id: str) -> tuple[int | None, bool]:
    """(the last round a checkpoint completed according to the log, whether the run is closed).

    A ``site_round`` with a ``checkpoint_hash`` (or a back-fill) is a round the site completed and
    checkpointed. One without is a partial round written when the site left mid-round (Ctrl-C, a
    spent budget): what it exchanged is booked, but no checkpoint completes it, so a resume from the
    previous round's checkpoint is consistent with it.
    """
    last: int | None = None
    ended = False
    for kind, body in run_records(path, run_id, ("site_round", "site_round_backfill", "site_run_end"), site_id):
        r = body.get("round")
        if kind == "site_run_end":
            ended = True
        elif (kind == "site_round_backfill" or body.get("checkpoint_hash")) and isinstance(r, int):
            last = r if last is None else max(last, r)
    return last, ended


def check_site_log_resumable(path: str | Path, run_id: str, site_id: str, completed_round: int) -> None:
    """Raise AuditError (check ``reconcile``) when a site checkpoint of ``completed_round`` cannot resume
    against the site's own log: the log records a later completed round (the checkpoint is older:
    restored from a backup?) or the run was already closed by ``site_run_end``."""
    p = Path(path)
    last, ended = _site_log_state(p, run_id, site_id)
    if ended:
        raise AuditError(f"audit log {p} already closes run {run_id} for site {site_id!r} (site_run_end): this "
                         "site finished the run; there is nothing to resume. Start a new run with a new --out",
                         check="reconcile")
    if last is not None and last > completed_round:
        raise AuditError(f"audit log {p} records round {last} as completed but the site checkpoint has completed "
                         f"only round {completed_round}: the checkpoint is older than the log (restored from a "
                         "backup?). Resuming would record rounds twice; resume from the latest checkpoint or start "
                         "a new run", check="reconcile")


class SiteAuditTrail:
    """Site-side round records for one run, signed by the site's key.

    ``key`` is a private key file path (mode 0600) or an already loaded key (tests, samples).
    """

    def __init__(self, log_path: str | Path, key: str | Path | Ed25519PrivateKey, *, run_id: str, site_id: str,
                 clock: Clock = utc_now) -> None:
        records.check_string(site_id, "site_id")
        signing = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
        self.log = AuditLog(log_path, signing, clock=clock)
        self.run_id, self.site_id = run_id, site_id

    def start(self, *, round: int, config_hash: str | None = None, cert_fingerprint: str | None = None,
              server_fingerprint: str | None = None) -> None:
        """Call once per launch (fresh or resumed), before the first round it will run."""
        self.log.append(records.site_run_start(
            run_id=self.run_id, site_id=self.site_id, round=round, software_version=__version__,
            config_hash=config_hash, cert_fingerprint=cert_fingerprint, server_fingerprint=server_fingerprint))
        self.log.checkpoint(run_id=self.run_id)

    def round_finished(self, round: int, *, steps: int, samples: int, ledger: Mapping[str, Any],
                       epsilon: float | None = None, delta: float | None = None,
                       checkpoint_hash: str | None = None) -> None:
        """Write the round's record and a signed checkpoint.

        ``ledger`` is ``FrameLedger.take(round)``; ``epsilon``/``delta`` the privacy spent so far
        (as the site reports it to the server); ``checkpoint_hash`` the site checkpoint's SHA-256.
        """
        self.log.append(records.site_round(
            run_id=self.run_id, site_id=self.site_id, round=round, steps=steps, samples=samples,
            epsilon=_finite(epsilon), delta=_finite(delta), ledger=ledger, checkpoint_hash=checkpoint_hash))
        self.log.checkpoint(run_id=self.run_id)

    def run_finished(self, rounds: int, *, ledger: Mapping[str, Any]) -> None:
        """The run's last record: ``ledger`` = ``FrameLedger.take(rounds)``, the exchange after the last round.

        The server's ``run_end`` record holds its side of the same tail; ``cross-check`` compares them.
        """
        self.log.append(records.site_run_end(run_id=self.run_id, site_id=self.site_id, rounds=rounds, ledger=ledger))
        self.log.checkpoint(run_id=self.run_id)

    def attempt_abandoned(self, round: int, rejoined_round: int, ledger: FrameLedger,
                          reported: MutableMapping[int, dict[str, Any]], *, cause: str) -> dict[int, dict[str, Any]]:
        """The site gives up an exchange and joins again: put what it booked in it on the record; return that.

        Call after joining again and before ``ledger`` is replaced by a fresh one. ``round`` = the
        round the site was in; ``rejoined_round`` = the round the server admitted it to; ``reported``
        = the site's summaries of rounds it reported but has not recorded yet (``FrameLedger.take`` after
        its end-of-round report), updated here; ``cause`` = what failed (a status name such as
        ``UNAVAILABLE``). What the site booked goes where it belongs:

        - admitted to ``round + 1`` after sending its report: the server completed ``round`` (with the
          report, or the sync fetched next fails and the site was dropped): the frames booked under
          ``round`` stay for the site's ``site_round`` of it (moved into ``reported`` when the failure
          came before the report's reply, e.g. the server died right after closing the round);
        - admitted to ``round``: the round is trained again: its reported summary, if any, is abandoned;
        - everything else booked (the exchange after the report, a validation, a partial round) is
          abandoned: written in one ``site_round_interrupted`` record (signed at once), unless empty.

        A server that restarted lost its own ledgers of the attempt (it writes ``round_interrupted``):
        without this record those frames would be in no signed record at either end.
        """
        if (rejoined_round == round + 1 and round not in reported and round in ledger.open_rounds()
                and ledger.summary(round)["up"]["types"].get("round_end")):  # its report was sent
            reported[round] = ledger.take(round)
        books = {r: ledger.summary(r) for r in ledger.open_rounds()}
        if rejoined_round == round and round in reported:
            books[round] = reported.pop(round)
        books = {r: led for r, led in books.items() if led["up"]["frames"] or led["down"]["frames"]}
        if books:
            self.log.append(records.site_round_interrupted(
                run_id=self.run_id, site_id=self.site_id, round=round, rejoined_round=rejoined_round, ledgers=books,
                reason=f"the exchange failed ({cause}) and the site joined again, at round {rejoined_round}; these "
                       "frames are in no site_round record"))
            self.log.checkpoint(run_id=self.run_id)
        return books

    def left(self, round: int, reason: str) -> None:
        """The site stops taking part (e.g. privacy budget spent); signed at once."""
        self.log.append(records.leave(run_id=self.run_id, round=round, site_id=self.site_id, reason=reason))
        self.log.checkpoint(run_id=self.run_id)

    def reconcile(self, next_round: int, checkpoint_hash: str | None = None) -> list[int]:
        """Back-fill rounds the site checkpoint holds but the log lacks (crash window); return them.

        ``next_round`` is the first round the checkpoint has *not* completed (the checkpoint's
        ``round`` field). Each missing round gets a ``site_round_backfill`` record (flagged
        recovered: the ledger and counts of that round are lost); the checkpoint hash goes on
        the last one. Existing lines are never rewritten. An unsigned tail is signed. Raises
        AuditError (check ``reconcile``) when the log is *ahead* of the checkpoint.
        """
        last, _ = _site_log_state(self.log.path, self.run_id, self.site_id)  # partial rounds do not count
        missing = rounds_to_backfill(last, next_round, self.log.path)
        for r in missing:
            self.log.append(records.site_round_backfill(
                run_id=self.run_id, site_id=self.site_id, round=r, log_last_round=last,
                checkpoint_hash=checkpoint_hash if r == next_round - 1 else None,
                reason=backfill_reason(r, next_round)))
        if not self.log.signed:
            self.log.checkpoint(run_id=self.run_id)
        return missing

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> SiteAuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


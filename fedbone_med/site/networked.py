"""``fedbone-site train``: one hospital site training against a networked FedBone server.

The site runtime (:class:`~fedbone_med.site.runtime.SiteRuntime`) is the same one the in-process
federation uses; here it talks :class:`~fedbone_med.transport.grpc_client.GrpcTransport` (mutual TLS
plus the sealed envelope) and learns the schedule (rounds, steps, seed) from the server's join reply.

Per round: the steps, the end-of-round report, the server's round sync (averaged embedding), a
checkpoint, then validation and a second checkpoint with the metrics. The site keeps the state it
had at the start of the current round (in memory, and on disk as the previous round's checkpoint),
so that whatever fails it can line up with the server again:

- the server is unreachable, restarted or lost the session (UNAVAILABLE, DEADLINE_EXCEEDED,
  FAILED_PRECONDITION "no session"): reconnect with exponential backoff and join again;
- the server dropped this site (ABORTED: it missed a deadline, or re-joined mid-round): join again.

After joining again the server's reply names the round this site takes part in next:

- the round the site was in (a restarted server resumed from the checkpoint of the round before):
  roll back to the start of that round and train it again;
- the next round (the server completed this round, then restarted or dropped the site): fetch the
  round's sync if this site has not applied it yet, validate, and go on;
- a later round (the site was dropped and missed rounds): keep the state and go on from there.

Ctrl-C leaves the federation cleanly; the last completed round's checkpoint is already on disk.
A site whose privacy budget is spent stops before sending, checkpoints, leaves and says why.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..audit.ledger import FrameLedger, empty_summary
from ..audit.site_trail import SiteAuditTrail, check_site_log_resumable, ensure_site_key
from ..checkpoint import file_sha256, load_checkpoint, save_checkpoint, write_json_atomic
from ..config import SiteConfig
from ..configtools import config_hash
from ..crypto.identity import fingerprint
from ..crypto.kits import SiteKit
from ..data.sources import load_site_data
from ..errors import CheckpointError, ConfigError, ProtocolError
from ..privacy.errors import BudgetExceeded
from ..transport.grpc_client import GrpcTransport, RemoteError
from ..transport.limits import DEFAULT_MAX_MESSAGE_BYTES, LOOPBACK_HOSTS, split_address
from ..transport.wire import WIRE_DTYPES
from .metrics import primary_metric
from .runtime import SiteRuntime

RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"}


def _needs_rejoin(exc: RemoteError) -> bool:
    """A failure after which the site reconnects and joins again (anything else is fatal)."""
    if exc.code in RETRY_CODES or exc.code == "ABORTED":
        return True
    return exc.code == "FAILED_PRECONDITION" and "no session" in exc.details


@dataclass
class _Progress:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    rejoins: list[dict[str, Any]] = field(default_factory=list)


class NetworkedSite:
    """Runs one site against a server; see the module docstring for the failure behaviour."""

    def __init__(self, cfg: SiteConfig, kit: SiteKit, out_dir: str | Path, *, address: str | None = None,
                 reconnect_timeout: float = 600.0, call_timeout: float = 660.0, progress: bool = True,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, server_name: str = "localhost",
                 insecure_dev: bool = False) -> None:
        self.cfg = cfg
        self.kit = kit
        self.out = Path(out_dir)
        self.address = address or kit.address
        self.reconnect_timeout = reconnect_timeout
        self.call_timeout = call_timeout
        self.progress = progress
        self.max_message_bytes = max_message_bytes
        self.server_name = server_name
        self.insecure_dev = insecure_dev  # no TLS (loopback only); the envelope and identity keys stay on
        self.data = load_site_data(cfg)
        self.transport: GrpcTransport | None = None
        self.runtime: SiteRuntime | None = None
        self.log = _Progress()
        self.stopped: dict[str, Any] | None = None
        self._round_start_state: dict[str, Any] | None = None  # runtime state at the start of the current round
        self._synced_round = -1  # the last round whose sync this site applied
        self.ledger = FrameLedger()  # every sealed frame this site sent and received, per round
        self._ledgers: dict[int, dict[str, Any]] = {}  # round -> ledger summary, taken after the round's report
        self._steps_in_round = 0  # training steps of the current round completed (for a partial round record)
        self._checkpointed_round = -1  # the round this process last wrote a checkpoint for
        self.audit: SiteAuditTrail | None = None

    # -- connection -------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        tqdm.write(f"[{self.cfg.name}] {msg}", file=sys.stderr)

    def _connect(self) -> GrpcTransport:
        """Open a session with the server, retrying with exponential backoff while it is unreachable.

        The site's own kit certificate is checked first (validity window, signed by the kit's CA, its
        key; a warning when it expires within 14 days). A TLS certificate failure (``TlsError``: the
        server's certificate, or the server refusing this site's) stops at once: retrying cannot fix it.
        """
        from ..transport.grpc_client import TlsError, check_kit_certificate

        if self.insecure_dev and split_address(self.address)[0] not in LOOPBACK_HOSTS:
            raise ConfigError(f"--insecure-dev connects without TLS to loopback only; refusing {self.address!r}")
        if not self.insecure_dev:
            warning = check_kit_certificate(self.kit.ca_pem, self.kit.cert_pem, self.kit.key_pem)
            if warning is not None and self.runtime is None:  # once, at the first connect
                self._say(warning)
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.5
        run_id = self.runtime.run_id if self.runtime is not None and self.runtime.run_id else None
        while True:
            try:
                return GrpcTransport(
                    self.cfg.name, self.address, ca_pem=self.kit.ca_pem, cert_pem=self.kit.cert_pem,
                    key_pem=self.kit.key_pem, identity_key=self.kit.identity_key,
                    server_public_key=self.kit.server_identity, run_id=run_id, server_name=self.server_name,
                    max_message_bytes=self.max_message_bytes, timeout=self.call_timeout, ledger=self.ledger,
                    insecure_dev=self.insecure_dev,
                )
            except TlsError:
                raise
            except RemoteError as exc:
                if exc.code not in RETRY_CODES or time.monotonic() + delay > deadline:
                    raise ProtocolError(f"site '{self.cfg.name}': cannot reach the server at {self.address} "
                                        f"({exc.code}: {exc.details})") from None
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _join(self) -> int:
        """(Re)connect and join; returns the round the server admits this site to."""
        if self.transport is not None:
            self.transport.close()
        self.transport = self._connect()
        if self.runtime is None:
            self.runtime = SiteRuntime(self.cfg, self.transport, self.data, seed=None)
        else:
            self.runtime.transport = self.transport
        reply = self.runtime.join()
        if reply.schedule is None:
            raise ProtocolError(f"site '{self.cfg.name}': the server did not send its training schedule")
        self.transport.wire_dtype = WIRE_DTYPES[reply.schedule.wire_dtype]
        return reply.round

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "site.pt"

    def _checkpoint(self, completed_round: int, evaluated: bool) -> None:
        assert self.runtime is not None
        state = self.runtime.state_dict()
        state["completed_round"] = completed_round
        state["evaluated"] = evaluated
        save_checkpoint(state, self.ckpt_path)
        self._checkpointed_round = completed_round

    def _results(self) -> dict[str, Any]:
        rt = self.runtime
        described = rt.describe() if rt is not None else {}  # no runtime before the first join
        return {
            "site": self.cfg.name,
            "run_id": rt.run_id if rt is not None else "",
            **described,
            "rounds": self.log.rounds,
            "reconnects": self.log.reconnects,
            "rejoins": self.log.rejoins,
            "stopped": self.stopped,
        }

    def _write_results(self) -> None:
        write_json_atomic(self._results(), self.out / "site-results.json")

    # -- training ---------------------------------------------------------------------------------
    def _resume_state(self) -> dict[str, Any] | None:
        """``--resume``, before joining: the checkpoint, checked against this site and its own audit log.

        Everything that would refuse the resume is checked here, so a refused resume never takes a
        place in the federation (the other sites would wait for it until the step deadline).
        """
        if not self.ckpt_path.exists():
            self._say(f"--resume: no checkpoint at {self.ckpt_path}; starting afresh")
            return None
        state = load_checkpoint(self.ckpt_path, "site")
        if state.get("site") != self.cfg.name:
            raise CheckpointError(f"{self.ckpt_path} belongs to site {state.get('site')!r}, not {self.cfg.name!r}")
        completed = int(state["completed_round"])
        check_site_log_resumable(self.out / "audit" / "site.jsonl", str(state.get("run_id", "")), self.cfg.name,
                                 completed)
        return state

    def _refuse_after_join(self, message: str) -> None:
        """A resume the server's answer rules out: give the place back at once, then stop."""
        self._leave_quietly()
        raise ProtocolError(message)

    def run(self, resume: bool = False) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._resume_state() if resume else None
        rnd = self._join()
        rt = self.runtime
        assert rt is not None and rt.joined is not None and rt.joined.schedule is not None
        sched = rt.joined.schedule
        rt.configure_privacy(sched.rounds * sched.steps_per_round)
        if state is not None:
            completed = int(state["completed_round"])
            if state.get("run_id") != rt.run_id:
                self._refuse_after_join(
                    f"site '{self.cfg.name}': the checkpoint {self.ckpt_path} is from run {state.get('run_id')!r} "
                    f"but the server runs {rt.run_id!r}; a site resumes only into the run it trained in. To join "
                    f"the new run, start without --resume and a new --out")
            if rnd <= completed:
                self._refuse_after_join(
                    f"site '{self.cfg.name}': this site's checkpoint has completed round {completed}, but the server "
                    f"is at round {rnd}: the server is behind this site (its checkpoint was restored from an older "
                    f"copy, or it could not record a round). Nothing was trained or logged. Restore the site "
                    f"checkpoint of round {rnd - 1} or the server's checkpoint of round {completed}, or start a "
                    "new run")
            try:
                rt.load_state_dict(state)
            except CheckpointError as exc:
                self._refuse_after_join(str(exc))
            self._synced_round = completed
            prior = self.out / "site-results.json"
            if prior.exists():
                import json

                self.log.rounds = [r for r in json.loads(prior.read_text())["rounds"]
                                   if r["round"] <= self._synced_round]
            self._say(f"resumed from the checkpoint of round {self._synced_round}")
        if rt.privacy is not None:  # write-ahead privacy charges: a crash mid-round never un-spends budget
            replayed = rt.privacy.attach_journal(self.out / "checkpoints" / "privacy.journal",
                                                 fresh=state is None)
            if replayed:
                self._say(f"{replayed} privacy charge(s) of the interrupted round replayed from the journal")
        self._round_start_state = copy.deepcopy(rt.state_dict())
        self._open_audit(rnd, resumed=state is not None)
        total = sched.rounds * sched.steps_per_round
        bar = tqdm(total=total, initial=rnd * sched.steps_per_round, disable=not self.progress, unit="step",
                   desc=self.cfg.name, file=sys.stderr, leave=False)
        try:
            while rnd < sched.rounds and self.stopped is None:
                try:
                    self._train_round(rnd, sched.steps_per_round, sched.embedding_fedavg, bar)
                    rnd += 1
                except RemoteError as exc:
                    if not _needs_rejoin(exc):
                        raise
                    rnd = self._recover(rnd, exc)
                    assert rt.joined is not None and rt.joined.schedule is not None
                    if rt.joined.schedule.rounds != sched.rounds:  # the server resumed with more (or fewer) rounds
                        self._say(f"the server now runs {rt.joined.schedule.rounds} rounds (was {sched.rounds})")
                        sched = rt.joined.schedule
                        bar.total = sched.rounds * sched.steps_per_round
                    bar.n = rnd * sched.steps_per_round
                    bar.refresh()
        except KeyboardInterrupt:
            self._say("interrupted: leaving the federation (the last completed round is checkpointed)")
            self._close_partial_rounds(rnd, self._steps_in_round)
            self._leave_quietly()
            self._write_results()
            raise
        finally:
            bar.close()
            if self.audit is not None and (self.stopped is not None or rnd < sched.rounds):
                self.audit.left(rnd, self.stopped["reason"] if self.stopped else "interrupted")
        if self.audit is not None and self.stopped is None:
            # the exchange after the last round (its sync, the last validation), before Leave
            self.audit.run_finished(sched.rounds, ledger=self.ledger.take(sched.rounds))
        self._leave_quietly()
        self._write_results()
        if self.audit is not None:
            self.audit.close()
        return self._results()

    def _open_audit(self, rnd: int, resumed: bool) -> None:
        """The site's own signed log: what it sent and received each round, and its privacy spent."""
        rt = self.runtime
        assert rt is not None
        key = ensure_site_key(self.out / "keys", self.cfg.name)
        self.audit = SiteAuditTrail(self.out / "audit" / "site.jsonl", key, run_id=rt.run_id, site_id=self.cfg.name)
        if resumed:
            self.audit.reconcile(self._synced_round + 1, file_sha256(self.ckpt_path))
        self.audit.start(round=rnd, config_hash=config_hash(self.cfg), cert_fingerprint=fingerprint(self.kit.cert_pem))

    def _leave_quietly(self) -> None:
        if self.runtime is None or self.transport is None:
            return
        try:
            self.runtime.leave()
        except (RemoteError, ProtocolError) as exc:
            self._say(f"could not leave cleanly ({exc}); the server will drop this site at its deadline")

    def _train_round(self, rnd: int, steps: int, share_embedding: bool, bar: tqdm) -> None:
        rt = self.runtime
        assert rt is not None
        t0 = time.perf_counter()
        self._steps_in_round = 0
        last = rnd * steps + steps - 1
        if self._synced_round < rnd:  # not yet trained (a recovery may have trained and synced it already)
            for i in range(steps):
                step = rnd * steps + i
                try:
                    loss = rt.train_step(rnd, step, i)
                except BudgetExceeded as exc:
                    self.stopped = {"round": rnd, "step": step, "reason": str(exc)}
                    self._say(f"stopped: {exc}")
                    self._write_results()
                    self._close_partial_rounds(rnd, i)
                    return
                self._steps_in_round = i + 1
                bar.update(1)
                elapsed = time.perf_counter() - t0
                post = {"round": rnd, "loss": f"{loss:.3f}", "steps/s": f"{(i + 1) / max(elapsed, 1e-9):.2f}"}
                if rt.privacy is not None:
                    post["eps"] = f"{rt.privacy.report().get('epsilon', float('nan')):.2f}"
                bar.set_postfix(post)
            report = rt.end_round(rnd, {}, share_embedding)
            self._ledgers[rnd] = self.ledger.take(rnd)
            rt.sync_round(rnd)
            self._synced_round = rnd
            self._checkpoint(rnd, evaluated=False)
        else:
            report = {"train_loss": float("nan")}
        metrics = rt.evaluate(rnd, last)
        record = {"round": rnd, **report, **metrics, "seconds": time.perf_counter() - t0}
        self.log.rounds = [r for r in self.log.rounds if r["round"] != rnd] + [record]
        self._checkpoint(rnd, evaluated=True)
        self._round_start_state = copy.deepcopy(rt.state_dict())
        self._write_results()
        if self.audit is not None:
            ledger = self._ledgers.pop(rnd, None)
            steps_done = steps if ledger is not None else 0
            self.audit.round_finished(
                rnd, steps=steps_done, samples=steps_done * min(self.cfg.train.batch_size, len(self.data.train)),
                ledger=ledger or empty_summary(), epsilon=record.get("epsilon"),
                delta=record.get("delta"), checkpoint_hash=file_sha256(self.ckpt_path))
        eps = f", eps {record['epsilon']:.2f}" if "epsilon" in record else ""
        self._say(f"round {rnd}: {primary_metric(self.cfg.task)} {metrics['primary']:.3f}, "
                  f"train loss {record['train_loss']:.3f}{eps} ({record['seconds']:.1f} s)")

    def _close_partial_rounds(self, rnd: int, steps_done: int) -> None:
        """Before leaving mid-run: write the rounds this site exchanged frames in but has no record of yet.

        The server's record of such a round lists the site (with the steps it aggregated and the frames
        it saw), so the site's own log must say what it sent and received too: round ``rnd`` with
        ``steps_done`` steps (all of them if it was trained and synced, validation pending), and a later
        round (the validation after a sync is booked there) with none. An exchange cut in the middle
        (e.g. by Ctrl-C) then shows up in ``cross-check`` as the difference it is.
        """
        if self.audit is None or self.runtime is None:
            return
        rt = self.runtime
        assert rt.joined is not None and rt.joined.schedule is not None
        spent = rt.privacy.report() if rt.privacy is not None else {}
        per_step = min(self.cfg.train.batch_size, len(self.data.train))
        # rounds trained and reported (validation pending): every step; the round in progress: those done
        rounds = {r: (ledger, rt.joined.schedule.steps_per_round) for r, ledger in self._ledgers.items()}
        self._ledgers.clear()
        for r in self.ledger.open_rounds():
            if r not in rounds:
                rounds[r] = (self.ledger.take(r), steps_done if r == rnd else 0)
        for r, (ledger, steps) in sorted(rounds.items()):
            if ledger["up"]["frames"] or ledger["down"]["frames"]:
                # a round trained, synced and checkpointed (its validation cut short) is complete: its
                # record names the checkpoint, so a resume from it neither back-fills nor repeats it
                done = self._checkpointed_round == r and self.ckpt_path.exists()
                self.audit.round_finished(r, steps=steps, samples=steps * per_step, ledger=ledger,
                                          epsilon=spent.get("epsilon"), delta=spent.get("delta"),
                                          checkpoint_hash=file_sha256(self.ckpt_path) if done else None)

    def _roll_back(self) -> None:
        """Back to the start of the current round, except the privacy accountant: what was sent was sent.

        The partial round's releases stay charged (and its noise generators move on), so redoing the
        round costs privacy budget twice rather than pretending the first attempt never left the site.
        """
        rt = self.runtime
        assert rt is not None and self._round_start_state is not None
        spent = copy.deepcopy(rt.privacy.state_dict()) if rt.privacy is not None else None
        rt.load_state_dict(copy.deepcopy(self._round_start_state))
        if rt.privacy is not None and spent is not None:
            rt.privacy.load_state_dict(spent)

    def _recover(self, rnd: int, exc: RemoteError) -> int:
        """Reconnect and join again after ``exc`` during round ``rnd``; return the round to run next."""
        rt = self.runtime
        assert rt is not None
        self.log.reconnects += 1
        self._say(f"lost the round ({exc.code}: {exc.details}); reconnecting")
        admitted = self._join()
        if self.audit is not None:  # what the failed attempt booked goes on the record before its ledger is replaced
            self.audit.attempt_abandoned(rnd, admitted, self.ledger, self._ledgers, cause=exc.code)
        # A fresh ledger after a failure: a restarted server books from scratch too, and a round this site
        # trains again must not be booked twice. The round around the failure may differ between the two
        # logs in `fedbone-audit cross-check`, which is what an auditor should see.
        self.ledger = FrameLedger()
        assert self.transport is not None
        self.transport.ledger = self.ledger
        self.log.rejoins.append({"during_round": rnd, "admitted_round": admitted, "reason": exc.code})
        if admitted == rnd:
            # The server resumed from the end of the previous round: train this round again from its start.
            assert self._round_start_state is not None
            self._roll_back()
            self._synced_round = rnd - 1
            self._say(f"server resumed at round {rnd}: training it again from its start")
            return rnd
        if admitted == rnd + 1:
            if self._synced_round >= rnd:
                return rnd  # only the validation of this round was lost: _train_round runs it again
            # The server completed this round before the failure: apply its sync, then validate.
            try:
                rt.sync_round(rnd)
                self._synced_round = rnd
                self._checkpoint(rnd, evaluated=False)
                self._say(f"round {rnd} was completed by the server; its sync applied")
                return rnd  # _train_round skips the steps and validates
            except RemoteError:
                pass  # this site's report did not make it into the round: it was dropped
        if admitted < rnd:
            raise ProtocolError(f"site '{self.cfg.name}': the server is back at round {admitted} but this site "
                                f"already completed round {rnd - 1}; restore matching checkpoints")
        if self._synced_round < rnd:  # dropped mid-round: the partial round's updates are discarded
            assert self._round_start_state is not None
            self._roll_back()
            self._synced_round = rnd - 1
        self._say(f"admitted again from round {admitted}")
        return admitted

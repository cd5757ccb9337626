"""Run a federation described by an :class:`ExperimentConfig`, in one process.

The server coordinator and every site runtime are the real ones; they talk through
the in-process transport. Steps interleave the sites (site 1, 2, ..., K for step t, then
step t + 1), which is what the server's step barrier enforces over a network too.

Outputs in ``out_dir``: ``results.json`` (per-site metrics per round, aggregation
statistics per step) and ``checkpoints/`` (server and one file per site; ``resume=True``
continues from them). Every round boundary is written by the server's
:class:`~fedbone_med.server.boundary.RoundBoundary`, as ``fedbone-server serve`` writes it: the
server checkpoint, every site checkpoint and ``results.json`` staged, the events and the signed
round record (the commit point for all of them), then the renames; a failed write keeps nothing
of the round (:class:`~fedbone_med.server.boundary.RoundNotRecorded`, exit code 7) and
``resume=True`` completes a round a crash cut after its commit point. Each site's own log
records the round after that (a crash in between is back-filled on resume).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import __version__
from ..audit.ledger import FrameLedger, LedgerBook
from ..audit.site_trail import SiteAuditTrail, ensure_site_key
from ..checkpoint import file_sha256, load_checkpoint, write_json_atomic
from ..config import ExperimentConfig
from ..configtools import config_hash, resume_changes, to_plain
from ..data.sources import load_site_data
from ..perf import machine_info
from ..privacy.errors import BudgetExceeded
from ..server import Coordinator
from ..server.audit_trail import ServerAuditTrail, ensure_server_key, module_hash
from ..server.boundary import RoundBoundary, RoundEnd, RoundNotRecorded, write_failure
from ..site import SiteRuntime, derive_seed
from ..transport import InProcessTransport


class Federation:
    """A server and its sites in one process."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, audit: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.hash = config_hash(cfg)
        # A run id names one launch (the audit log keeps every launch apart); --resume keeps it.
        started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_id = f"{cfg.name}-s{cfg.seed}-{self.hash[:10]}-{started}"
        self.coordinator = Coordinator(
            cfg.server, run_id=self.run_id, seed=cfg.seed, config_hash=self.hash,
            embedding_fedavg=cfg.embedding_fedavg,
        )
        self.coordinator.config_json = json.dumps(to_plain(cfg), sort_keys=True)
        self._config_change: tuple[str, list[str]] | None = None  # (hash before, keys) when resumed with changes
        # Both ends book every exchange (as over gRPC), for the server's and each site's audit log.
        self.ledger = LedgerBook() if audit else None
        self.site_ledgers = {s.name: FrameLedger() for s in cfg.sites} if audit else {}
        self.sites = [
            SiteRuntime(s, InProcessTransport(self.coordinator, site_ledger=self.site_ledgers.get(s.name),
                                              server_ledger=self.ledger),
                        load_site_data(s), seed=derive_seed(cfg.seed, s.name))
            for s in cfg.sites
        ]
        self.site_audits: dict[str, SiteAuditTrail] = {}
        for site in self.sites:
            site.join()
            site.configure_privacy(cfg.rounds * cfg.steps_per_round)
        self.stopped: dict[str, dict[str, Any]] = {}  # sites that left early, and why
        self.audit_enabled = audit
        self.audit: ServerAuditTrail | None = None
        self.results: dict[str, Any] = {
            "experiment": cfg.name,
            "run_id": self.run_id,
            "config_hash": self.hash,
            "seed": cfg.seed,
            "software_version": __version__,
            "machine": machine_info(),
            "config": to_plain(cfg),
            "sites": {site.name: site.describe() for site in self.sites},
            "backbone_parameters": self.coordinator.num_params,
            "rounds": [],
            "aggregation": [],
        }
        self._digests: dict[Path, str] = {}  # the SHA-256 of every checkpoint the last round boundary wrote
        self.boundary = RoundBoundary(
            self.ckpt_dir / "server.pt", self.out / "results.json", self.out / "audit" / "server.jsonl",
            resume=f"`fedbone run` with the same experiment, --out {self.out} and --resume",
            others=[self._site_ckpt(site.name) for site in self.sites])

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _site_ckpt(self, name: str) -> Path:
        return self.ckpt_dir / f"site-{name}.pt"

    def resume(self) -> int:
        """Load the last completed round's checkpoints; return the next round to run."""
        # a crash after a round's commit point (its signed record) and before the renames: finish it; files a
        # round that never committed staged are removed
        if self.boundary.complete() == "committed":
            print(f"the last round's checkpoints were recorded but not yet in place; moved them to {self.ckpt_dir}",
                  file=sys.stderr)
        server = load_checkpoint(self.ckpt_dir / "server.pt", "server")
        if server["config_hash"] != self.hash:  # only rounds (of an unfinished run) and network.* may change
            changed = resume_changes(str(server.get("config_json", "")), self.cfg,
                                     completed_rounds=int(server["round"]), where=f"checkpoint in {self.ckpt_dir}")
            self._config_change = (str(server["config_hash"]), changed)
        self.coordinator.load_state_dict(server)
        self.run_id = self.coordinator.run_id = self.results["run_id"] = str(server["run_id"])
        for site in self.sites:
            site.load_state_dict(load_checkpoint(self._site_ckpt(site.name), "site"))
            site.run_id = self.run_id
        prior = json.loads((self.out / "results.json").read_text())
        done = self.coordinator.round
        self.results["rounds"] = [r for r in prior["rounds"] if r["round"] < done]
        self.results["aggregation"] = [a for a in prior["aggregation"] if a["round"] < done]
        self.coordinator.step_log = []
        return done

    def run(self, resume: bool = False, progress: bool = True, on_round: Callable[[dict], None] | None = None) -> dict:
        cfg = self.cfg
        start = self.resume() if resume else 0
        for site in self.sites:  # write-ahead privacy charges: a crash mid-round never un-spends budget
            if site.privacy is not None:
                replayed = site.privacy.attach_journal(self.ckpt_dir / f"privacy-{site.name}.journal", fresh=not resume)
                if replayed:
                    print(f"site '{site.name}': {replayed} privacy charge(s) of the interrupted round replayed "
                          "from its journal", file=sys.stderr)
        total = (cfg.rounds - start) * cfg.steps_per_round
        bar = tqdm(total=total, disable=not progress, desc="training", unit="step", file=sys.stderr, leave=False)
        try:
            if self.audit_enabled:
                key = ensure_server_key(self.out / "keys")
                self.audit = ServerAuditTrail(self.out / "audit" / "server.jsonl", key, run_id=self.run_id,
                                              config_hash=self.hash)
                if not resume:
                    self.audit.start(self.coordinator.backbone, cfg.server.aggregation.method,
                                     [s.name for s in self.sites], cfg.seed, start)
                else:  # a log an older version wrote may lag its checkpoint by one round: back-fill it
                    c = self.coordinator
                    self.audit.reconcile(start, file_sha256(self.ckpt_dir / "server.pt"),
                                         backbone_hash=module_hash(c.backbone), step=c.step)
                    if self._config_change is not None:  # resumed with more or fewer rounds: on the record
                        self.audit.config_changed(start, self._config_change[0], self.hash, self._config_change[1])
                self._open_site_audits(start, resume)
            self.coordinator.take_events()  # the initial joins: start() recorded them
            for rnd in range(start, cfg.rounds):
                t0 = time.perf_counter()
                if self.audit is not None:
                    self.audit.round_started(self.coordinator.backbone)
                for i in range(cfg.steps_per_round):
                    step = rnd * cfg.steps_per_round + i
                    losses = self._train_step(rnd, step, i)
                    bar.update(1)
                    bar.set_postfix({"round": rnd, **{k[:12]: f"{v:.3f}" for k, v in losses.items()}})
                record = self._end_round(rnd, (rnd + 1) * cfg.steps_per_round - 1)
                record["seconds"] = time.perf_counter() - t0
                usage = self._round_boundary(rnd, record)
                self._site_rounds(rnd, record, usage)
                if on_round is not None:
                    on_round(record)
            if self.audit is not None and start < cfg.rounds:
                self._close_audit_run()
        finally:  # on a crash too: release the audit logs' locks; the checkpoints are those of a complete round
            bar.close()
            if self.audit is not None:
                self.audit.close()
                self.audit = None
            for trail in self.site_audits.values():
                trail.close()
            self.site_audits = {}
        self.results["stopped"] = self.stopped
        self.results["final"] = self._final_metrics()
        write_json_atomic(self.results, self.out / "results.json")
        return self.results

    def _open_site_audits(self, start: int, resume: bool) -> None:
        """Each site's own signed log, in ``sites/NAME/`` (as a networked site keeps it)."""
        for site in self.sites:
            d = self.out / "sites" / site.name
            trail = SiteAuditTrail(d / "audit" / "site.jsonl", ensure_site_key(d / "keys", site.name),
                                   run_id=self.run_id, site_id=site.name)
            if resume:  # a crash between the server's round record and the sites' own: back-filled
                trail.reconcile(start, file_sha256(self._site_ckpt(site.name)))
            trail.start(round=start, config_hash=config_hash(site.cfg))
            self.site_audits[site.name] = trail

    def _close_audit_run(self) -> None:
        """Every round is done: the run_end records, with what each site exchanged after the last round."""
        assert self.audit is not None
        rounds = self.cfg.rounds
        self.audit.run_finished(rounds, self.coordinator.backbone, file_sha256(self.ckpt_dir / "server.pt"),
                                ledgers=self.ledger.take_round(rounds) if self.ledger else None)
        for name, trail in self.site_audits.items():
            trail.run_finished(rounds, ledger=self.site_ledgers[name].take(rounds))

    def _round_boundary(self, rnd: int, record: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """The round's checkpoints (server and every site), results and server audit record, all or none
        (:class:`RoundBoundary`); returns the round's usage."""
        c = self.coordinator
        steps, usage = c.step_log, c.take_usage()
        results = {**self.results, "rounds": [*self.results["rounds"], record],
                   "aggregation": [*self.results["aggregation"], *steps]}
        sites = record["sites"]
        self.boundary.audit = self.audit
        self._digests = self.boundary.write(RoundEnd(
            round=rnd, state=c.state_dict(), results=results, backbone=c.backbone,
            method=self.cfg.server.aggregation.method, usage=usage, steps=steps, events=c.take_events(),
            privacy={n: (m.get("epsilon"), m.get("delta")) for n, m in sites.items()},
            losses={n: m["train_loss"] for n, m in sites.items() if "train_loss" in m},
            ledgers=self.ledger.take_round(rnd) if self.ledger else None,
            checkpoints={self._site_ckpt(s.name): s.state_dict() for s in self.sites},
            left_reasons={n: why["reason"] for n, why in self.stopped.items()}))
        self.results, c.step_log = results, []
        return usage

    def _site_rounds(self, rnd: int, record: dict[str, Any], usage: dict[str, tuple[int, int]]) -> None:
        """Each site's own record of the round, after the server's (the commit point); a crash in between is
        back-filled in the site's log on resume."""
        try:
            for site in self.sites:
                trail = self.site_audits.get(site.name)
                if trail is None:
                    continue
                ledger = self.site_ledgers[site.name].take(rnd)
                m = record["sites"].get(site.name, {})
                steps, samples = usage.get(site.name, (0, 0))
                trail.round_finished(rnd, steps=steps, samples=samples, ledger=ledger, epsilon=m.get("epsilon"),
                                     delta=m.get("delta"), checkpoint_hash=self._digests[self._site_ckpt(site.name)])
                if "stopped" in m and m["stopped"]["round"] == rnd:
                    trail.left(rnd, m["stopped"]["reason"])
        except OSError as exc:
            where = Path(exc.filename) if exc.filename else self.out / "sites"
            raise RoundNotRecorded(write_failure(
                rnd, where, exc, f"Round {rnd} is checkpointed and in the server's audit log; a site's own log "
                "lacks it, and --resume back-fills it there", self.boundary.resume)) from None

    def _train_step(self, rnd: int, step: int, i: int) -> dict[str, float]:
        """One step of every active site; a site whose privacy budget is spent stops and leaves."""
        losses = {}
        for s in self.sites:
            if s.name in self.stopped:
                continue
            try:
                losses[s.name] = s.train_step(rnd, step, i)
            except BudgetExceeded as exc:
                self.stopped[s.name] = {"round": rnd, "step": step, "reason": str(exc)}
                s.leave()
                print(f"site '{s.name}' stopped: {exc}", file=sys.stderr)
        return losses

    def _end_round(self, rnd: int, step: int) -> dict[str, Any]:
        share = self.cfg.embedding_fedavg
        active = [s for s in self.sites if s.name not in self.stopped]
        losses = {s.name: s.end_round(rnd, {}, share) for s in active}
        groups = {s.name: s.sync_round(rnd) for s in active}
        sites: dict[str, Any] = {}
        for s in active:
            metrics = s.evaluate(rnd, step)
            sites[s.name] = {**losses[s.name], **metrics, "fedavg_group": list(groups[s.name])}
        for name, why in self.stopped.items():
            sites[name] = {"stopped": why}
        return {"round": rnd, "sites": sites}

    def _final_metrics(self) -> dict[str, Any]:
        """Each site's metrics from the last round it completed."""
        final: dict[str, Any] = {}
        for record in self.results["rounds"]:
            for name, m in record["sites"].items():
                if "stopped" not in m:
                    final[name] = m
        return final


def format_table(results: dict[str, Any]) -> str:
    """The per-site results table printed at the end of a run."""
    rows = [("site", "modality", "task", "metric", "value", "chance", "train loss", "epsilon")]
    for name, info in results["sites"].items():
        m = results.get("final", {}).get(name, {})
        key = info["primary_metric"]
        eps = f"{m['epsilon']:.2f}" if "epsilon" in m else "-"
        if name in results.get("stopped", {}):
            eps += " (stopped: budget)"
        rows.append(
            (name, info["modality"], info["task"], key, f"{m.get(key, float('nan')):.3f}",
             f"{m.get('chance', float('nan')):.3f}", f"{m.get('train_loss', float('nan')):.3f}", eps)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verify_logs(cfg: ExperimentConfig, server_dir: Path, sites_dir: Path) -> dict[str, Any]:
    """Verify the server's audit log and cross-check every site's own log against it (as an auditor would).

    ``server_dir`` holds ``audit/server.jsonl`` and ``keys/server-audit-key.pub.pem``; ``sites_dir/NAME``
    each site's ``audit/site.jsonl`` and public key. The run is finished, so its log must be closed by
    its ``run_end`` record (a log cut at a signed checkpoint would otherwise pass as a shorter run).
    """
    from ..audit import load_public_keys, verify_log
    from ..audit.crosscheck import cross_check
    from ..audit.errors import AuditError

    server_log = server_dir / "audit" / "server.jsonl"
    server_keys = load_public_keys([server_dir / "keys" / "server-audit-key.pub.pem"])
    summary: dict[str, Any] = {"server_log": str(server_log)}
    try:
        summary["server"] = verify_log(server_log, server_keys, require_ended=True).summary()
    except AuditError as exc:
        raise AuditError(f"the server's audit log does not verify: {exc}", check=exc.check, line=exc.line) from None
    summary["sites"] = {}
    for s in cfg.sites:
        site_dir = sites_dir / s.name
        site_keys = load_public_keys([site_dir / "keys" / f"site-{s.name}-audit-key.pub.pem"])
        try:
            report = cross_check(server_log, site_dir / "audit" / "site.jsonl", server_keys=server_keys,
                                 site_keys=site_keys, allow_backfilled=True)
        except AuditError as exc:
            summary["sites"][s.name] = f"does not verify: {exc}"
            continue
        first = report.first_difference
        summary["sites"][s.name] = (f"agrees with the server on {report.scope()}" if first is None
                                    else f"differs: {first.describe()}")
    return summary

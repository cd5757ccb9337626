"""``fedbone-server serve``: the coordinator behind gRPC with mutual TLS, checkpointed every round.

The server waits until every expected site has joined (or, after ``network.join_timeout_s``, starts
with at least ``network.min_sites``), then the sites drive the protocol. When a round completes, the
coordinator calls :meth:`NetworkedServer._round_finished` with its lock held, so the checkpoint and
the audit record describe exactly the round boundary; a site's round sync returns only after both are
on disk. ``--resume`` restarts from that checkpoint with the same run id: the sites reconnect by
themselves and train the interrupted round again.

Outputs in ``out``: ``checkpoints/server.pt``, ``server-results.json`` (per-round participation,
losses, privacy reports, aggregation statistics per step, membership events), ``audit/server.jsonl``
and ``keys/`` (the audit signing key, created on first use).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from .. import __version__
from ..audit.ledger import LedgerBook
from ..checkpoint import file_sha256, load_checkpoint, write_json_atomic
from ..config import ServeConfig
from ..configtools import config_hash, resume_changes, to_plain
from ..crypto.kits import ServerKit
from ..errors import CheckpointError, ConfigError, FedboneError, ProtocolError
from ..transport.grpc_service import bound_port, serve
from ..transport.messages import RoundReport
from ..transport.wire import WIRE_DTYPES
from .audit_trail import ServerAuditTrail, ensure_server_key, install_rotated_key, module_hash
from .boundary import RoundBoundary, RoundEnd, RoundNotRecorded, record_events
from .coordinator import Coordinator
from .events import Joined


class NetworkedServer:
    def __init__(self, cfg: ServeConfig, kit_dir: str | Path, out_dir: str | Path, *, address: str | None = None,
                 resume: bool = False, port_file: str | Path | None = None, audit: bool = True,
                 log: Any = None, progress: str = "bar", insecure_dev: bool = False,
                 rotate_audit_key: str | Path | None = None) -> None:
        """``progress``: "bar" (a progress bar on stderr), "lines" (``progress STEP TOTAL`` lines on stderr,
        for a launcher to draw its own bar) or "none"."""
        self.cfg = cfg
        self.kit = ServerKit.load(kit_dir)
        self.out = Path(out_dir)
        self.address = address or cfg.network.address
        self.resume = resume
        self.port_file = Path(port_file) if port_file is not None else None
        self.hash = config_hash(cfg)
        self.progress = progress
        self.insecure_dev = insecure_dev  # no TLS (loopback only, refused elsewhere); the envelope stays on
        self.rotate_audit_key = Path(rotate_audit_key) if rotate_audit_key is not None else None
        self._bar: tqdm | None = None
        self._print = log or (lambda msg: (tqdm.write if self._bar is not None else print)(msg, file=sys.stderr))
        expected = cfg.sites or tuple(sorted(self.kit.site_keys))
        missing = [s for s in expected if s not in self.kit.site_keys]
        if missing:
            raise ConfigError(f"sites {', '.join(missing)} are not registered (or are revoked) in "
                              f"{self.kit.root / 'registry.json'}; provision them first")
        if not expected:
            raise ConfigError(f"no registered site in {self.kit.root / 'registry.json'}")
        self.expected = tuple(expected)
        started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_id = f"{cfg.name}-s{cfg.seed}-{self.hash[:10]}-{started}"
        net = cfg.network
        self.coordinator = Coordinator(
            cfg.server, run_id=run_id, seed=cfg.seed, config_hash=self.hash, embedding_fedavg=cfg.embedding_fedavg,
            wait_timeout=max(net.step_deadline_s, net.round_deadline_s, net.join_timeout_s) + 60.0,
            steps_per_round=cfg.steps_per_round, rounds=cfg.rounds, expected_sites=self.expected,
            min_sites=net.min_sites, step_deadline=net.step_deadline_s, round_deadline=net.round_deadline_s,
            wire_dtype=net.wire_dtype,
        )
        self.coordinator.config_json = json.dumps(to_plain(cfg), sort_keys=True)
        self._config_change: tuple[str, list[str]] | None = None  # (hash before, keys) when resumed with changes
        self.results: dict[str, Any] = {
            "experiment": cfg.name, "run_id": run_id, "config_hash": self.hash, "seed": cfg.seed,
            "software_version": __version__, "config": to_plain(cfg), "expected_sites": list(self.expected),
            "backbone_parameters": self.coordinator.num_params, "rounds": [], "aggregation": [], "events": [],
            "transport": "grpc",
        }
        self.audit_enabled = audit
        self.audit: ServerAuditTrail | None = None
        self.ledger = LedgerBook()  # every sealed frame per site: the audit log's per-round exchange digests
        self.fingerprints: dict[str, str] = {}  # site -> its certificate's SHA-256, filled by the service
        self._round_t0 = time.perf_counter()
        self._done = threading.Event()
        self._failure: RoundNotRecorded | None = None  # a round boundary that could not be written: stop
        self.boundary = RoundBoundary(
            self.ckpt_path, self.out / "server-results.json", self.out / "audit" / "server.jsonl",
            resume=f"{self.resume_command}; the sites reconnect by themselves", fingerprints=self.fingerprints,
            retry_note=", and the sites were told to retry", warn=self._print)
        if resume:
            self._load()

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "server.pt"

    def _load(self) -> None:
        # a crash between a round's signed record and the renames: finish it (or drop a round never recorded)
        if self.boundary.complete() == "committed":
            self._print(f"the last round's checkpoint was recorded but not yet in place; moved it to {self.ckpt_path}")
        if not self.ckpt_path.exists():
            raise CheckpointError(f"--resume: no server checkpoint at {self.ckpt_path}")
        state = load_checkpoint(self.ckpt_path, "server")
        if state["config_hash"] != self.hash:  # only rounds (of an unfinished run) and network.* may change
            changed = resume_changes(str(state.get("config_json", "")), self.cfg, completed_rounds=int(state["round"]),
                                     where=str(self.ckpt_path))
            self._config_change = (str(state["config_hash"]), changed)
        self.coordinator.load_state_dict(state)
        self.coordinator.run_id = self.results["run_id"] = str(state["run_id"])
        prior = self.out / "server-results.json"
        if prior.exists():
            old = json.loads(prior.read_text())
            done = self.coordinator.round
            self.results["rounds"] = [r for r in old["rounds"] if r["round"] < done]
            self.results["aggregation"] = [a for a in old["aggregation"] if a["round"] < done]
            self.results["events"] = old.get("events", [])
        self.results["events"].append({"event": "resume", "round": self.coordinator.round})

    # -- per round (coordinator lock held) ------------------------------------------------------
    def _round_finished(self, rnd: int, reports: dict[str, RoundReport]) -> None:
        """Record the round boundary (:class:`~.boundary.RoundBoundary`): checkpoint, results, events and
        audit record, all of them or none.

        A failed write (a full disk, a read-only directory, a file-size limit) leaves the previous
        checkpoint, the results and the audit log as they were and raises :class:`RoundNotRecorded`:
        the coordinator then refuses every call as retryable (the sites wait and reconnect) and
        :meth:`run` stops the server with that error (exit code 7). After the cause is fixed,
        ``serve --resume`` trains the round again from the previous checkpoint.
        """
        c = self.coordinator
        steps = c.step_log
        usage = c.take_usage()  # (lost with the round if it cannot be recorded: the server stops then)
        ledgers = self.ledger.take_round(rnd)
        events = list(c.events)
        record = {
            "round": rnd,
            "seconds": time.perf_counter() - self._round_t0,
            "sites": {name: {"train_loss": r.train_loss, "samples": r.samples, **r.extra}
                      for name, r in sorted(reports.items())},
            "usage": {k: {"steps": v[0], "samples": v[1]} for k, v in usage.items()},
        }
        results = {**self.results, "rounds": [*self.results["rounds"], record],
                   "aggregation": [*self.results["aggregation"], *steps],
                   "events": [*self.results["events"], *(e.to_dict() for e in events)]}
        # a site that left mid-round (e.g. its privacy budget was spent) reported its spend with the leave
        privacy = {**c.departed_privacy, **{n: (r.extra.get("epsilon"), r.extra.get("delta"))
                                            for n, r in reports.items()}}
        self.boundary.audit = self.audit
        try:
            self.boundary.write(RoundEnd(
                round=rnd, state=c.state_dict(), results=results, backbone=c.backbone,
                method=self.cfg.server.aggregation.method, usage=usage, steps=steps, events=events,
                privacy=privacy, losses={n: r.train_loss for n, r in reports.items()}, ledgers=ledgers))
        except RoundNotRecorded as exc:
            self._failure = exc
            self._done.set()
            raise
        except BaseException as exc:  # an AuditError, or Ctrl-C in the middle: nothing of the round stays
            if not isinstance(exc, KeyboardInterrupt):
                self._failure = RoundNotRecorded(f"round {rnd} was not recorded: {exc}")
                self._done.set()
            raise
        # the round is on disk: from here on it is complete
        self.results = results
        c.step_log = []
        del c.events[:len(events)]
        c.departed_privacy = {}
        if self.audit is not None and rnd + 1 < self.cfg.rounds:
            self.audit.round_started(c.backbone)
        losses = ", ".join(f"{n} {r.train_loss:.3f}" for n, r in sorted(reports.items()))
        notes = "".join(f"; {e.kind} {getattr(e, 'site', '')}".rstrip() for e in events if not isinstance(e, Joined))
        self._print(f"round {rnd}: {len(reports)} site(s), train loss {losses}{notes} "
                    f"({record['seconds']:.1f} s)")
        self._round_t0 = time.perf_counter()
        if rnd + 1 >= self.cfg.rounds:
            self._done.set()

    @property
    def resume_command(self) -> str:
        return f"fedbone-server serve --resume --out {self.out} (with the same --config and --kit)"

    def _record_config_change(self) -> None:
        """Resumed with an edited configuration (rounds, network.*): say so in the log and the results."""
        if self._config_change is None:
            return
        before, changed = self._config_change
        if self.audit is not None:
            self.audit.config_changed(self.coordinator.round, before, self.hash, changed)
        self.results["events"].append({"event": "config_change", "round": self.coordinator.round,
                                       "changed_keys": changed})
        self._print(f"resumed with a changed configuration ({', '.join(changed)}); recorded in the audit log")

    def _rotate_audit_key(self, new_key: Path) -> None:
        """Recorded and signed by the old key; from then on the new key signs, and is the server's key."""
        assert self.audit is not None
        old_id = self.audit.log.key_id
        new_id = self.audit.rotate_key(new_key)
        install_rotated_key(self.out / "keys", new_key, old_id)
        self._print(f"audit signing key rotated: {old_id} -> {new_id}; the old public key is in "
                    f"{self.out / 'keys' / 'retired'}; auditors need both")

    def _audit_revocations(self) -> None:
        """Record the revocations this launch honours (from registry.json / crl.pem), once per run."""
        assert self.audit is not None
        from ..crypto.identity import load_registry

        logged = set()
        log_path = self.audit.log.path
        if log_path.exists():
            for line in log_path.read_bytes().splitlines():
                if b'"kind":"revocation"' in line and self.coordinator.run_id.encode() in line:
                    logged.add(json.loads(line)["body"]["site_id"])
        for name, entry in sorted(load_registry(self.kit.root).sites.items()):
            if entry.revoked and name not in logged:
                self.audit.site_revoked(name, f"revoked in the registry ({entry.reason or 'unspecified'}, "
                                              f"{entry.revoked_at or 'time unknown'}); refused from this launch",
                                        entry.fingerprint)

    # -- main -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, c = self.cfg, self.coordinator
        self.out.mkdir(parents=True, exist_ok=True)
        _check_writable(self.ckpt_path.parent)
        if c.round >= cfg.rounds:
            self._print(f"all {cfg.rounds} rounds are already complete in {self.ckpt_path}")
            return self.results
        if self.audit_enabled:
            key = ensure_server_key(self.out / "keys")
            self.audit = ServerAuditTrail(self.out / "audit" / "server.jsonl", key, run_id=c.run_id,
                                          config_hash=self.hash)
            if not self.resume:
                self.audit.start(c.backbone, cfg.server.aggregation.method, list(self.expected), cfg.seed, c.round,
                                 joins=False)
            else:  # verify the log, check the checkpoint against it, back-fill a crash gap, record the restart
                try:
                    self.audit.resume(c.round, self.ckpt_path, file_sha256(self.ckpt_path),
                                      backbone_hash=module_hash(c.backbone), step=c.step, key_dir=self.out / "keys")
                except BaseException:
                    self.audit.close()
                    self.audit = None
                    raise
            if self.rotate_audit_key is not None:
                self._rotate_audit_key(self.rotate_audit_key)
            self._audit_revocations()
        self._record_config_change()
        if self.audit is not None:
            self.audit.round_started(c.backbone)
        c.on_round_finished = self._round_finished
        server = serve(
            c, address=self.address, server_key_pem=self.kit.key_pem, server_cert_pem=self.kit.cert_pem,
            ca_pem=self.kit.ca_pem, registry_dir=self.kit.root, identity_key=self.kit.identity_key,
            site_keys=self.kit.site_keys, max_message_bytes=cfg.network.max_message_mb << 20,
            ledger=self.ledger, peer_fingerprints=self.fingerprints, wire_dtype=WIRE_DTYPES[cfg.network.wire_dtype],
            max_frame_bytes=cfg.network.max_frame_mb << 20, insecure_dev=self.insecure_dev,
        )
        port = bound_port(server)
        host = self.address.rpartition(":")[0]
        if self.port_file is not None:
            tmp = self.port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(self.port_file)
        self._print(f"fedbone-server {__version__}: run {c.run_id}, listening on {host}:{port} "
                    f"({'INSECURE development mode: no TLS' if self.insecure_dev else 'mutual TLS'}), "
                    f"waiting for {len(self.expected)} site(s): {', '.join(self.expected)}; "
                    f"round {c.round} of {cfg.rounds}")
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        stopping_on_error = True
        try:
            self._wait_for_sites()
            self._show_progress()
            if self._failure is not None:
                raise self._failure
            self._wait_for_leaves()
            stopping_on_error = False
        except KeyboardInterrupt:
            self._print(f"interrupted: the last completed round ({c.round - 1}) is checkpointed in {self.ckpt_path}; "
                        "restart with --resume")
            raise
        finally:
            server.stop(grace=2.0).wait()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
            try:
                self._close_run()
            except (OSError, FedboneError) as exc:
                if not stopping_on_error:
                    raise
                # already stopping for an error (e.g. a full disk, which may refuse these writes too): the
                # checkpoint and the log stay at the last recorded round boundary
                self._print(f"while stopping: {exc}")
        return self.results

    def _close_run(self) -> None:
        """At shutdown: the membership events since the last round and a signed checkpoint of the log;
        the run's closing record once every round is recorded and the sites have left."""
        c, cfg = self.coordinator, self.cfg
        if self.audit is not None:
            events = c.take_events()
            self.results["events"].extend(e.to_dict() for e in events)
            try:
                record_events(self.audit, events, fingerprints=self.fingerprints)
                if c.round >= cfg.rounds and self._failure is None:  # every round done, the sites gone
                    self.audit.run_finished(cfg.rounds, c.backbone, file_sha256(self.ckpt_path),
                                            self.ledger.take_round(cfg.rounds))
                self.audit.sign()
            finally:
                self.audit.close()
                self.audit = None
        write_json_atomic(self.results, self.out / "server-results.json")

    def _show_progress(self) -> None:
        """Until the last round completes: the steps aggregated so far, with throughput."""
        c, cfg = self.coordinator, self.cfg
        total = cfg.rounds * cfg.steps_per_round
        shown = c.step
        if self.progress == "bar":
            self._bar = tqdm(total=total, initial=shown, unit="step", desc="federation", file=sys.stderr,
                             leave=False)
        try:
            while not self._done.wait(timeout=0.5):
                step = min(c.step, total)
                if step == shown:
                    continue
                if self._bar is not None:
                    self._bar.update(step - shown)
                    self._bar.set_postfix({"round": c.round, "sites": len(c.sites)})
                elif self.progress == "lines":
                    print(f"progress {step} {total}", file=sys.stderr, flush=True)
                shown = step
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _wait_for_sites(self) -> None:
        c = self.coordinator
        deadline = time.monotonic() + self.cfg.network.join_timeout_s
        while not c.started:
            if time.monotonic() > deadline:
                n = c.start()  # raises ProtocolError below min_sites
                self._print(f"join timeout: starting with {n} site(s): {', '.join(sorted(c.sites))}")
                return
            time.sleep(0.1)
        self._print(f"all {len(self.expected)} site(s) joined; training")

    def _wait_for_leaves(self, grace: float | None = None) -> None:
        """After the last round the sites still validate through the backbone: serve until they leave."""
        c = self.coordinator
        deadline = time.monotonic() + (grace if grace is not None else self.cfg.network.round_deadline_s)
        while time.monotonic() < deadline:
            if not c.member_count():
                return
            time.sleep(0.1)
        self._print("some sites did not leave after the last round; stopping anyway")


def _check_writable(directory: Path) -> None:
    """Before any site joins: the checkpoint directory takes a file (a read-only or missing mount fails here)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise CheckpointError(f"the checkpoint directory {directory} is not writable ({code}: {exc.strerror}); "
                              "make it writable by the server's user or choose another --out") from None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def wait_for_port(port_file: Path, process: Any, timeout: float = 120.0) -> int:
    """The port a server process wrote to ``port_file`` (for launchers and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text().strip())
        if process is not None and process.poll() is not None:
            raise ProtocolError(f"the server process exited with code {process.returncode} before listening")
        time.sleep(0.05)
    raise ProtocolError(f"the server did not start listening within {timeout:.0f} s")

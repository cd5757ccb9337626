"""`fedbone-site train --resume` refuses what cannot resume before it joins the federation.

A refused resume that had joined first would hold a place in the round: the other sites would
wait for it until the step deadline and a step would be skipped (issue 14, D2). These tests give
the site a server address where nothing listens: a site that tried to join first would spend its
reconnect timeout retrying; the checks must refuse at once, naming the check.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from conftest import site_cfg
from fedbone_med.audit.errors import AuditError
from fedbone_med.audit.ledger import empty_summary
from fedbone_med.audit.site_trail import SiteAuditTrail, ensure_site_key
from fedbone_med.config import TaskConfig
from fedbone_med.crypto.kits import SiteKit
from fedbone_med.crypto.provision import provision
from fedbone_med.errors import CheckpointError
from fedbone_med.site.networked import NetworkedSite
from fedprocs import free_port

RUN = "run-a"


def _site(tmp: Path) -> NetworkedSite:
    provision(tmp / "fed", ["eye-a"], server_address="127.0.0.1:50051")
    cfg = site_cfg("eye-a", "oct_edema", "oct", TaskConfig(type="classification", num_classes=2), n_train=8,
                   n_val=4)
    return NetworkedSite(cfg, SiteKit.load(tmp / "fed" / "sites" / "eye-a"), tmp / "out",
                         address=f"127.0.0.1:{free_port()}", reconnect_timeout=60.0, progress=False)


def _checkpoint(out: Path, completed: int, site: str = "eye-a") -> None:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "site", "site": site, "run_id": RUN, "completed_round": completed, "evaluated": True},
               out / "checkpoints" / "site.pt")


def _log(out: Path, rounds: list[tuple[int, bool]], ended: bool = False) -> None:
    """The site's own log with ``(round, checkpointed)`` records (checkpointed False: a partial round)."""
    trail = SiteAuditTrail(out / "audit" / "site.jsonl", ensure_site_key(out / "keys", "eye-a"), run_id=RUN,
                           site_id="eye-a")
    trail.start(round=0)
    for r, checkpointed in rounds:
        trail.round_finished(r, steps=2, samples=8, ledger=empty_summary(),
                             checkpoint_hash=("ab" * 32) if checkpointed else None)
    if ended:
        trail.run_finished(rounds[-1][0] + 1, ledger=empty_summary())
    trail.close()


def _refused(site: NetworkedSite, match: str, error: type[Exception] = AuditError) -> None:
    t0 = time.monotonic()
    with pytest.raises(error, match=match):
        site.run(resume=True)
    assert time.monotonic() - t0 < 10, "the site tried to reach the server before refusing"
    assert site.transport is None  # it never connected


def test_a_checkpoint_older_than_the_sites_log_is_refused_before_joining(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _checkpoint(site.out, completed=0)
    _log(site.out, [(0, True), (1, True)])  # round 1 completed: this checkpoint was restored from a backup
    _refused(site, "records round 1 as completed but the site checkpoint has completed only round 0")


def test_a_run_the_sites_log_already_closed_is_refused_before_joining(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _checkpoint(site.out, completed=1)
    _log(site.out, [(0, True), (1, True)], ended=True)
    _refused(site, "nothing to resume")


def test_a_checkpoint_of_another_site_is_refused_before_joining(tmp_path: Path) -> None:
    site = _site(tmp_path)
    _checkpoint(site.out, completed=0, site="eye-b")
    _refused(site, "belongs to site 'eye-b'", CheckpointError)


def test_a_partial_round_after_the_checkpoint_does_not_block_the_resume(tmp_path: Path) -> None:
    """Ctrl-C mid-round 1 leaves a partial record of round 1 after the checkpoint of round 0: that
    resume is valid, so it goes on to contact the server (here: nothing listens, so it fails there)."""
    site = _site(tmp_path)
    site.reconnect_timeout = 1.0
    _checkpoint(site.out, completed=0)
    _log(site.out, [(0, True), (1, False)])
    with pytest.raises(Exception, match="cannot reach the server"):
        site.run(resume=True)

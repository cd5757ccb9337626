"""The server's audit trail: one signed, hash-chained record per training round.

Wraps :class:`fedbone_med.audit.AuditLog` with what the coordinator knows: which sites
took part, how many steps and samples each contributed, the aggregation statistics, the
backbone's hash before and after the round, and the hash of the checkpoint written. It
records identifiers, counts, hashes and statistics only (see ``audit/GUIDE.md``).

The signing key is the server's Ed25519 key (private key file mode 0600); auditors verify
with the public key beside it: ``fedbone-audit verify LOG --public-key PUB``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..audit import AggregationSummary, AuditLog, SiteRound, iso_utc, records
from ..audit.keys import generate_key, load_private_key, save_private_key, save_public_key
from ..audit.records import utc_now


def module_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes and bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else float(x)


class ServerAuditTrail:
    """Round records for one run, written by the process that owns the backbone."""

    def __init__(self, log_path: str | Path, key_path: str | Path, *, run_id: str, config_hash: str) -> None:
        self.log = AuditLog(log_path, load_private_key(key_path), clock=utc_now)
        self.run_id, self.config_hash = run_id, config_hash
        self._round_start: tuple[str, str] | None = None

    def start(self, backbone: nn.Module, aggregation: str, sites: list[str], seed: int, round: int) -> None:
        self.log.append(records.run_start(
            run_id=self.run_id, config_hash=self.config_hash, software_version=__version__,
            backbone_hash=module_hash(backbone), aggregation_method=aggregation, sites=sites, seed=seed,
        ))
        for site in sites:
            self.log.append(records.join(run_id=self.run_id, round=round, site_id=site))
        self.log.checkpoint(run_id=self.run_id)

    def round_started(self, backbone: nn.Module) -> None:
        self._round_start = (iso_utc(utc_now()), module_hash(backbone))

    def round_finished(self, round: int, backbone: nn.Module, usage: dict[str, tuple[int, int]],
                       steps: list[dict[str, Any]], method: str, checkpoint_hash: str,
                       privacy: dict[str, tuple[float | None, float | None]] | None = None) -> None:
        """``privacy``: site -> (epsilon, delta) spent so far, as the site reported it."""
        started, before = self._round_start or (iso_utc(utc_now()), module_hash(backbone))
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
        sites = [SiteRound(site_id=name, steps=n_steps, samples=n_samples,
                           epsilon=_finite(privacy.get(name, (None, None))[0]),
                           delta=_finite(privacy.get(name, (None, None))[1]))
                 for name, (n_steps, n_samples) in sorted(usage.items())]
        self.log.append(records.checkpoint_write(
            run_id=self.run_id, round=round, role="server", checkpoint_hash=checkpoint_hash))
        self.log.append(records.round_record(
            run_id=self.run_id, round=round, started_at=started, ended_at=iso_utc(utc_now()), sites=sites,
            aggregation=summary, backbone_hash_before=before, backbone_hash_after=module_hash(backbone),
            checkpoint_hash=checkpoint_hash, config_hash=self.config_hash, software_version=__version__,
        ))
        self.log.checkpoint(run_id=self.run_id)
        self._round_start = None

    def close(self) -> None:
        self.log.close()

"""Audit log cost: verifying a long log, and the audit writes' share of a demo round.

    OMP_NUM_THREADS=1 python benchmarks/audit.py --out FILE.json [--rounds 10000] [--repeats 3] [--demo-steps 2]

``verify_seconds_10k_rounds`` (goal < 2 s): a synthetic signed server log of 10,000 rounds
with 3 sites is written through the real API (:class:`ServerAuditTrail` with a tiny backbone:
``start``, then per round ``round_started`` / ``round_finished`` with per-site usage, ε/δ, training
losses, aggregation step statistics and :class:`LedgerBook` frame-ledger summaries of 6 frames per site,
which appends ``checkpoint_write`` + ``round`` + a signed ``log_checkpoint``), then
``verify_log`` is timed (median of ``--repeats``; the file is in the page cache). The log is
written to ``/dev/shm`` when it exists (tmpfs: fsync is free there, so the 30,000 fsync'd
appends do not dominate the benchmark's own run time; only verification is timed).

``append_overhead_fraction_of_round``: a real in-process federation of ``pipelines/demo.toml``
(4 phantom sites, swin-tiny backbone) runs 1 round of ``--demo-steps`` steps with auditing on, in
a temporary folder on the ordinary disk (real fsyncs). The audit writes of a round are timed
where the federation calls them: ``round_started`` (hashes the backbone) and ``round_finished``
(hashes the backbone, appends ``checkpoint_write`` and ``round``, signs a ``log_checkpoint``;
every append fsync'd). The round is timed from ``round_started`` to the end of ``round_finished``
(training steps, end of round, server/site checkpoints, audit). Because a demo round has
``steps_per_round`` = 40 steps and the benchmark runs only a few, the headline divides the audit
time by the *estimated* demo round: measured round - measured step time + mean step time x 40.
``append_overhead_fraction_of_measured_round`` is the raw ratio for the short round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "processor": platform.processor()}


def build_log(folder: Path, rounds: int, sites: tuple[str, ...] = ("site-01", "site-02", "site-03")) -> Path:
    """A signed server log of ``rounds`` rounds written through ServerAuditTrail (see the module docstring)."""
    import hashlib

    from torch import nn

    from fedbone_med.audit.ledger import LedgerBook
    from fedbone_med.audit.samples import fixed_clock
    from fedbone_med.server.audit_trail import ServerAuditTrail, ensure_server_key

    key = ensure_server_key(folder / "keys")
    backbone = nn.Linear(4, 4)
    log = folder / "server.jsonl"
    trail = ServerAuditTrail(log, key, run_id="bench-run", config_hash="c" * 64, clock=fixed_clock(step_s=1))
    book = LedgerBook()
    trail.start(backbone, "projection", list(sites), seed=0, round=0)
    for r in range(rounds):
        trail.round_started(backbone)
        for site in sites:
            for step in (2 * r, 2 * r + 1):
                payload = hashlib.sha256(f"{site}|{r}|{step}".encode()).digest()
                book.record(site, "up", "forward", r, step, payload)
                book.record(site, "down", "features", r, step, payload[::-1])
                book.record(site, "up", "backward", r, step, payload + payload)
        steps = [{"conflicting_pairs": (r + s) % 3, "min_cosine": -0.1 * s, "mean_cosine": 0.2,
                  "site_names": list(sites), "site_norms": [1.0 + 0.1 * i for i in range(len(sites))]}
                 for s in range(2)]
        usage = {s: (2, 16 + 8 * i) for i, s in enumerate(sites)}
        privacy = {s: (0.01 * (r + 1), 1e-5) for s in sites}
        losses = {s: 2.0 / (1 + 0.01 * r) + 0.1 * i for i, s in enumerate(sites)}
        trail.round_finished(r, backbone, usage, steps, "projection", hashlib.sha256(b"%d" % r).hexdigest(),
                             privacy, ledgers=book.take_round(r), losses=losses)
    trail.close()
    return log


def bench_verify(rounds: int, repeats: int) -> dict[str, Any]:
    from fedbone_med.audit.keys import load_public_keys
    from fedbone_med.audit.verify import verify_log

    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="fedbone-audit-bench-", dir=base) as tmp:
        t0 = time.perf_counter()
        log = build_log(Path(tmp), rounds)
        build_s = time.perf_counter() - t0
        keys = load_public_keys([Path(tmp) / "keys" / "server-audit-key.pub.pem"])
        times, report = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            report = verify_log(log, keys)
            times.append(time.perf_counter() - t0)
        assert report is not None and report.rounds["bench-run"] == list(range(rounds))
        return {"verify_seconds": statistics.median(times), "verify_seconds_all": times, "records": report.count,
                "log_bytes": log.stat().st_size, "build_seconds": build_s, "log_folder": base or tempfile.gettempdir()}


def bench_demo_round(steps: int) -> dict[str, Any]:
    from fedbone_med.config import ExperimentConfig, load_experiment
    from fedbone_med.configtools import deep_merge, from_mapping, to_plain
    from fedbone_med.experiments import federation as fed_mod
    from fedbone_med.server.audit_trail import ServerAuditTrail

    demo = load_experiment(REPO / "pipelines" / "demo.toml")
    cfg = from_mapping(ExperimentConfig, deep_merge(to_plain(demo), {"rounds": 1, "steps_per_round": steps}),
                       where="experiment")
    timing: dict[str, Any] = {"round_started": [], "round_finished": [], "round_t0": [], "round_t1": [], "steps": []}

    class TimedTrail(ServerAuditTrail):
        def round_started(self, backbone: Any) -> None:
            t0 = time.perf_counter()
            timing["round_t0"].append(t0)
            super().round_started(backbone)
            timing["round_started"].append(time.perf_counter() - t0)

        def round_finished(self, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            super().round_finished(*args, **kwargs)
            t1 = time.perf_counter()
            timing["round_finished"].append(t1 - t0)
            timing["round_t1"].append(t1)

    with tempfile.TemporaryDirectory(prefix="fedbone-audit-demo-") as tmp:
        t0 = time.perf_counter()
        federation = fed_mod.Federation(cfg, tmp)
        setup_s = time.perf_counter() - t0
        train_step = federation._train_step

        def timed_step(rnd: int, step: int, i: int) -> dict[str, float]:
            s0 = time.perf_counter()
            out = train_step(rnd, step, i)
            timing["steps"].append(time.perf_counter() - s0)
            return out

        federation._train_step = timed_step  # type: ignore[method-assign]
        original = fed_mod.ServerAuditTrail
        fed_mod.ServerAuditTrail = TimedTrail  # type: ignore[misc]
        try:
            federation.run(progress=False)
        finally:
            fed_mod.ServerAuditTrail = original  # type: ignore[misc]
        audit_lines = sum(1 for _ in open(Path(tmp) / "audit" / "server.jsonl", "rb"))
    audit_s = timing["round_started"][0] + timing["round_finished"][0]
    round_s = timing["round_t1"][0] - timing["round_t0"][0]
    step_s = statistics.mean(timing["steps"])
    estimated = round_s - sum(timing["steps"]) + step_s * demo.steps_per_round
    return {"setup_seconds": setup_s, "steps_measured": steps, "demo_steps_per_round": demo.steps_per_round,
            "sites": len(cfg.sites), "mean_step_seconds": step_s, "measured_round_seconds": round_s,
            "estimated_demo_round_seconds": estimated, "audit_round_started_seconds": timing["round_started"][0],
            "audit_round_finished_seconds": timing["round_finished"][0], "audit_seconds_per_round": audit_s,
            "audit_log_lines": audit_lines, "fraction_of_measured_round": audit_s / round_s,
            "fraction_of_demo_round": audit_s / estimated}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--rounds", type=int, default=10_000, help="rounds in the synthetic log (default 10000)")
    p.add_argument("--repeats", type=int, default=3, help="verify_log timings (median reported)")
    p.add_argument("--demo-steps", type=int, default=2, help="training steps of the measured demo round")
    p.add_argument("--skip-demo", action="store_true", help="only the verification benchmark")
    args = p.parse_args()
    t_all = time.perf_counter()
    verify = bench_verify(args.rounds, args.repeats)
    demo = None if args.skip_demo else bench_demo_round(args.demo_steps)
    key = "verify_seconds_10k_rounds" if args.rounds == 10_000 else f"verify_seconds_{args.rounds}_rounds"
    result: dict[str, Any] = {
        key: verify["verify_seconds"],
        "append_overhead_fraction_of_round": None if demo is None else demo["fraction_of_demo_round"],
        "append_overhead_fraction_of_measured_round": None if demo is None else demo["fraction_of_measured_round"],
        "goals": {"verify_seconds_10k_rounds": "< 2 s"},
        "verify": {"rounds": args.rounds, "sites": 3, **verify},
        "demo_round": demo,
        "benchmark_seconds": time.perf_counter() - t_all,
        "machine": _machine(),
    }
    runs = ", ".join(f"{t:.3f}" for t in verify["verify_seconds_all"])
    rows = [(key, f"{verify['verify_seconds']:.3f} s (goal < 2 s; {verify['records']} records, "
                  f"{verify['log_bytes'] / 1e6:.1f} MB; runs {runs})")]
    if demo is not None:
        rows += [("audit seconds per demo round",
                  f"{demo['audit_seconds_per_round']:.3f} s (round_started {demo['audit_round_started_seconds']:.3f}"
                  f" + round_finished {demo['audit_round_finished_seconds']:.3f})"),
                 ("measured round", f"{demo['measured_round_seconds']:.2f} s ({demo['steps_measured']} steps, "
                                    f"{demo['mean_step_seconds']:.2f} s/step, {demo['sites']} sites)"),
                 ("estimated demo round", f"{demo['estimated_demo_round_seconds']:.2f} s "
                                          f"({demo['demo_steps_per_round']} steps)"),
                 ("append_overhead_fraction_of_round", f"{demo['fraction_of_demo_round']:.4f}"),
                 ("append_overhead_fraction_of_measured_round", f"{demo['fraction_of_measured_round']:.4f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written {args.out} ({result['benchmark_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

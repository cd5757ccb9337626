"""Reproduce an experiment with FedBone and its baselines (``fedbone reproduce``).

Every method trains the same models (the experiment's backbone and each site's embedding,
adaptation module and head, initialised from the same seeds) on the same data and splits,
with the same batches, for ``rounds x steps_per_round`` steps per site:

=====================  ==================================================================
``local``              each site alone (embedding + its own backbone copy + head)
``fedavg``             the full model, backbone and embeddings averaged each round, heads
                       local (whatever the experiment's ``embedding_fedavg`` says)
``fedbone-mean``       FedBone, the server averages the sites' backbone gradients
``fedbone-projection`` FedBone, conflicting-gradient projection (the paper's method)
``central``            multi-task training on pooled data in one process (a reference)
=====================  ==================================================================

On request (``--methods``), the paper's GPAggregation (Algorithm 2) at each of its two
cadences, with the experiment's optimizer so that only the aggregation and cadence differ:
``fedbone-gpagg-step`` (Algorithm 1: every step's site gradients aggregated) and
``fedbone-gpagg-round`` (Figure 2: one backbone replica per site, the replicas' updates
aggregated once per round, ``server_lr`` = 1).

The FedBone methods share only the server's backbone; whether the sites also average their
embeddings is the experiment's ``embedding_fedavg`` (the ophthalmic experiment keeps them at
the sites, as in the FedBone paper, where each client keeps its task-specific model). On
request, the ablation ``fedbone-projection-avgemb`` runs FedBone (projection) with the
per-modality, sample-weighted FedAvg of embeddings at every round's end.

Outputs in ``out``: ``results.json`` (everything), ``results.csv`` (metric, mean, std and
per-seed values per site and method), ``costs.csv``, ``table.md``, ``report.md``, plots, and
``runs/METHOD-seedN/`` (the FedBone runs' own ``results.json`` and audit logs).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from .. import __version__
from ..checkpoint import write_json_atomic
from ..config import AggregationConfig, ExperimentConfig, experiment_from_mapping
from ..configtools import config_hash, read_toml, to_plain
from ..data.sources import SiteData, load_site_data
from ..errors import ConfigError, DataError
from ..models import build_backbone
from ..perf import machine_info
from .accounting import ByteLedger, CountingTransport, fedbone_bytes_per_round, site_costs
from .baselines import Centralised, LocalGroup
from .federation import Federation
from .report import LABELS, json_ready

METHODS: tuple[str, ...] = ("local", "fedavg", "fedbone-mean", "fedbone-projection", "central")
# Ablations, run on request (--methods): FedBone (projection) with the embeddings of sites of
# the same modality averaged (FedAvg, weighted by training samples) at every round's end.
ABLATIONS: tuple[str, ...] = ("fedbone-projection-avgemb",)
# The paper's aggregation at its two cadences (on request): method -> (aggregation method, cadence)
PAPER_METHODS: dict[str, tuple[str, Literal["step", "round"]]] = {
    "fedbone-gpagg-step": ("gpaggregation", "step"),
    "fedbone-gpagg-round": ("gpaggregation", "round"),
}
ALL_METHODS = METHODS + ABLATIONS + tuple(PAPER_METHODS)
# Methods that no longer exist, with what to use instead (named in the error).
RETIRED = {
    "fedbone-projection-localemb": "embeddings are kept at the sites by default now (fedbone-projection); "
                                   "the averaged-embedding variant is the ablation fedbone-projection-avgemb",
}
PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Profile:
    name: str
    experiment: Path
    seeds: tuple[int, ...]
    methods: tuple[str, ...]


def experiment_dir(name: str) -> Path:
    return PIPELINES / name


def load_profile(experiment: str, profile: str) -> Profile:
    """A profile from ``pipelines/EXPERIMENT/reproduce.toml``."""
    path = experiment_dir(experiment) / "reproduce.toml"
    if not path.is_file():
        raise ConfigError(f"no reproduction named {experiment!r} (expected {path})")
    profiles = read_toml(path).get("profiles", {})
    if profile not in profiles:
        raise ConfigError(f"{path}: no profile {profile!r}; known: {', '.join(sorted(profiles))}")
    p = profiles[profile]
    unknown = set(p) - {"experiment", "seeds", "methods"}
    if unknown:
        raise ConfigError(f"{path}: profile {profile!r} has unknown keys {sorted(unknown)}")
    methods = tuple(p.get("methods", METHODS))
    check_methods(methods, f"{path}: profile {profile!r}: ")
    return Profile(profile, path.parent / p["experiment"], tuple(int(s) for s in p.get("seeds", [0])), methods)


def load_experiment_file(path: Path) -> ExperimentConfig:
    return experiment_from_mapping(read_toml(path), base_dir=path.parent)


def check_data(cfg: ExperimentConfig) -> None:
    """Every real dataset the experiment reads is where the data root says; else one clear error."""
    from ..data.manifest import DATA_ROOT_ENV, default_data_root
    from ..data.pipeline import load_manifest

    missing = []
    for s in cfg.sites:
        if s.data.source != "manifest" or s.data.manifest is None:
            continue
        m = load_manifest(s.data.manifest)
        root = Path(m.root)
        if not root.is_absolute():
            root = default_data_root() / m.root
        if not root.is_dir():
            missing.append(f"{m.name} (site '{s.name}') at {root}")
    if missing:
        raise DataError(
            "real dataset(s) not found: " + "; ".join(missing) + f". Pass --data-root DIR or set {DATA_ROOT_ENV} "
            "to the folder that holds them (default: ../shared/data beside the checkout)"
        )


def check_methods(methods: Sequence[str], where: str = "") -> None:
    """One clear error for unknown (or retired) method names."""
    for m in methods:
        if m in RETIRED:
            raise ConfigError(f"{where}method {m!r} was removed: {RETIRED[m]}")
        if m not in ALL_METHODS:
            raise ConfigError(f"{where}unknown method {m!r}; known: {', '.join(ALL_METHODS)}")


def with_method(cfg: ExperimentConfig, method: str, seed: int) -> ExperimentConfig:
    cfg = replace(cfg, seed=seed)
    if method == "fedbone-projection-avgemb":
        cfg = replace(with_method(cfg, "fedbone-projection", seed), embedding_fedavg=True)
    elif method in PAPER_METHODS:
        name, cadence = PAPER_METHODS[method]
        agg = replace(cfg.server.aggregation, method=name, cadence=cadence, project_every=1, server_lr=1.0)
        cfg = replace(cfg, server=replace(cfg.server, aggregation=agg))
    elif method.startswith("fedbone-"):
        agg = replace(cfg.server.aggregation, method=method.removeprefix("fedbone-"))
        cfg = replace(cfg, server=replace(cfg.server, aggregation=agg))
    else:  # not used by the baselines' runners, but recorded
        cfg = replace(cfg, server=replace(cfg.server, aggregation=AggregationConfig(method="mean")))
    return cfg


def _embedding_groups(cfg: ExperimentConfig) -> dict[str, int]:
    """Size of each site's embedding-averaging group (same modality and embedding layout)."""
    keys = {s.name: (s.modality, s.model.embedding, s.model.stride) for s in cfg.sites}
    return {n: sum(1 for k in keys.values() if k == key) for n, key in keys.items()}


def run_fedbone(cfg: ExperimentConfig, run_dir: Path, transport: str, keep_checkpoints: bool,
                on_round: Callable[[dict], None] | None = None,
                data: dict[str, SiteData] | None = None) -> dict[str, Any]:
    """One FedBone run (the real Federation), with the bytes of every site's messages counted."""
    if transport == "grpc":
        try:
            from . import networked  # type: ignore[attr-defined]
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.networked":
                raise
            raise ConfigError(
                "--transport grpc is not available yet: the multi-process loopback federation "
                "(fedbone_med.experiments.networked) is not in this version; use --transport inprocess"
            ) from exc
        results: dict[str, Any] = networked.run_networked(cfg, run_dir)
        # Bytes from shapes (the same count CountingTransport makes in process; see the tests).
        with torch.random.fork_rng(devices=[]):
            backbone = build_backbone(cfg.server.backbone)
        groups = _embedding_groups(cfg)
        for s in cfg.sites:
            info = results["sites"][s.name]
            n_train = info.get("n_train", len(data[s.name].train) if data else None)
            n_val = info.get("n_val", len(data[s.name].val) if data else None)
            if n_train is None or n_val is None:
                raise ConfigError(f"the networked run's results do not say site '{s.name}''s split sizes")
            b = fedbone_bytes_per_round(cfg, s, backbone, n_train, n_val, groups[s.name])
            for record in results["rounds"]:
                if s.name in record["sites"] and "stopped" not in record["sites"][s.name]:
                    record["sites"][s.name].update(b, bytes_source="shapes")
        if not keep_checkpoints:
            for d in sorted(run_dir.glob("**/checkpoints"), reverse=True):
                shutil.rmtree(d, ignore_errors=True)
        return results
    if transport != "inprocess":
        raise ConfigError(f"--transport must be 'inprocess' or 'grpc', got {transport!r}")
    fed = Federation(cfg, run_dir)
    ledger = ByteLedger()
    for site in fed.sites:
        site.transport = CountingTransport(site.transport, site.name, ledger)

    def count(record: dict) -> None:
        for name, m in record["sites"].items():
            if "stopped" not in m:
                m.update(ledger.take(name), bytes_source="counted")
        if on_round is not None:
            on_round(record)

    results = fed.run(progress=False, on_round=count)
    write_json_atomic(results, run_dir / "results.json")
    if not keep_checkpoints:
        shutil.rmtree(fed.ckpt_dir, ignore_errors=True)
    return results


def run_method(method: str, cfg: ExperimentConfig, data: dict[str, SiteData], run_dir: Path,
               transport: str = "inprocess", keep_checkpoints: bool = False) -> dict[str, Any]:
    cfg = with_method(cfg, method, cfg.seed)
    if method.startswith("fedbone-"):
        results = run_fedbone(cfg, run_dir, transport, keep_checkpoints, data=data)
    elif method in ("local", "fedavg"):
        results = LocalGroup(cfg, data, fedavg=method == "fedavg").run()
    elif method == "central":
        results = Centralised(cfg, data).run()
    else:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    results["method"] = method
    return results


def _progress_line(i: int, total: int, method: str, seed: int, results: dict[str, Any], seconds: float) -> str:
    parts = []
    for name, info in results["sites"].items():
        m = results["final"].get(name, {})
        key = info["primary_metric"]
        parts.append(f"{name} {key} {m.get(key, float('nan')):.3f}")
    return f"[{i}/{total}] {LABELS[method]} seed {seed}: " + ", ".join(parts) + f"  ({seconds:.1f} s)"


def reproduce(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    transport: str = "inprocess",
    measure_memory: bool = True,
    keep_checkpoints: bool = False,
    profile: str = "custom",
    log: Log | None = None,
) -> dict[str, Any]:
    """Run every method for every seed; write the tables, report and plots; return the summary."""
    from .report import summarise, write_outputs  # noqa: I001 (matplotlib is imported lazily there)

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    check_methods(methods)
    if cfg.embedding_fedavg and any(m.startswith("fedbone-") for m in methods):
        say("note: this experiment says embedding_fedavg = true, so every FedBone method averages same-modality "
            "embeddings each round (fedbone-projection-avgemb is then the same as fedbone-projection)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t_all = time.perf_counter()
    check_data(cfg)
    t0 = time.perf_counter()
    data = {s.name: load_site_data(s) for s in cfg.sites}
    say(f"data: {len(cfg.sites)} sites loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    costs = site_costs(cfg, measure_memory=measure_memory)
    say(f"costs: parameters, MACs{', step memory' if measure_memory else ''} in {time.perf_counter() - t0:.1f} s")
    runs: list[dict[str, Any]] = []
    total = len(seeds) * len(methods)
    for seed in seeds:
        for method in methods:
            t0 = time.perf_counter()
            run_dir = out / "runs" / f"{method}-seed{seed}"
            results = run_method(method, replace(cfg, seed=seed), data, run_dir, transport, keep_checkpoints)
            seconds = time.perf_counter() - t0
            runs.append({"method": method, "seed": seed, "seconds": seconds, "results": results,
                         "run_dir": str(run_dir.relative_to(out)) if run_dir.exists() else None})
            say(_progress_line(len(runs), total, method, seed, results, seconds))
    meta = {
        "experiment": cfg.name,
        "profile": profile,
        "config": to_plain(cfg),
        "config_hash": config_hash(cfg),
        "seeds": list(seeds),
        "methods": list(methods),
        "transport": transport,
        "rounds": cfg.rounds,
        "steps_per_round": cfg.steps_per_round,
        "steps_per_site": cfg.rounds * cfg.steps_per_round,
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": time.perf_counter() - t_all,
        "software_version": __version__,
        "machine": machine_info(),
    }
    summary = summarise(cfg, runs, costs, meta)
    write_outputs(summary, out)
    summary["meta"]["seconds_with_outputs"] = time.perf_counter() - t_all
    write_json_atomic(json_ready(summary), out / "results.json")
    return summary

"""``fedbone reproduce``: FedBone against its baselines on a named experiment.

    fedbone reproduce ophthalmic [--quick | --profile NAME] [--data-root DIR] [--out DIR]
                                 [--transport inprocess|grpc] [--seeds N] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def add_parser(sub: Any) -> None:
    rep = sub.add_parser("reproduce", help="reproduce a paper experiment: FedBone against its baselines")
    rep.add_argument("experiment", help="which reproduction: ophthalmic (pipelines/ophthalmic/)")
    rep.add_argument("--quick", action="store_true", help="the short smoke profile (one seed, <= 5 min on a CPU)")
    rep.add_argument("--profile", help="a profile of pipelines/EXPERIMENT/reproduce.toml: default, quick, gpu")
    rep.add_argument("--experiment-file", type=Path,
                     help="use this experiment TOML instead of the profile's (e.g. a phantom-only variant)")
    rep.add_argument("--data-root", type=Path, help="folder holding the real datasets (else $FEDBONE_DATA_ROOT, "
                     "else ../shared/data beside the checkout)")
    rep.add_argument("--out", type=Path, help="output directory (default runs/reproduce-EXPERIMENT-PROFILE)")
    rep.add_argument("--transport", choices=("inprocess", "grpc"), default="inprocess",
                     help="how the FedBone runs' sites reach the server (grpc: multi-process loopback)")
    rep.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default: the profile's")
    rep.add_argument("--methods",
                     help="comma-separated methods: local,fedavg,fedbone-mean,fedbone-projection,central, "
                     "and the ablation fedbone-projection-avgemb (FedBone projection with same-modality "
                     "embeddings averaged each round), and the paper's GPAggregation at its two cadences, "
                     "fedbone-gpagg-step and fedbone-gpagg-round; default: the profile's")
    rep.add_argument("--rounds", type=int, help="override the number of rounds")
    rep.add_argument("--steps", type=int, help="override steps per round")
    rep.add_argument("--no-memory", action="store_true", help="skip the step-memory measurement")
    rep.add_argument("--keep-checkpoints", action="store_true", help="keep the FedBone runs' checkpoints")
    rep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..experiments.reproduce import load_experiment_file, load_profile, reproduce

    if args.quick and args.profile not in (None, "quick"):
        raise ConfigError("--quick and --profile disagree; give one of them")
    profile_name = "quick" if args.quick else (args.profile or "default")
    if args.data_root is not None:
        if not args.data_root.is_dir():
            raise ConfigError(f"--data-root {args.data_root}: not a directory")
        os.environ["FEDBONE_DATA_ROOT"] = str(args.data_root.resolve())
    profile = load_profile(args.experiment, profile_name)
    cfg = load_experiment_file(args.experiment_file or profile.experiment)
    if args.rounds is not None or args.steps is not None:
        cfg = replace(cfg, rounds=args.rounds or cfg.rounds, steps_per_round=args.steps or cfg.steps_per_round)
        bad = cfg.validate()
        if bad:
            raise ConfigError("; ".join(bad))
    seeds = tuple(range(args.seeds)) if args.seeds is not None else profile.seeds
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else profile.methods
    out = args.out or Path("runs") / f"reproduce-{args.experiment}-{profile_name}"
    print(f"fedbone reproduce {args.experiment} (profile {profile_name}): {len(cfg.sites)} sites, "
          f"{len(methods)} methods x {len(seeds)} seed(s), {cfg.rounds} x {cfg.steps_per_round} steps per site, "
          f"FedBone over {args.transport}; output in {out}", file=sys.stderr)
    t0 = time.perf_counter()
    summary = reproduce(cfg, out, seeds=seeds, methods=methods, transport=args.transport,
                        measure_memory=not args.no_memory, keep_checkpoints=args.keep_checkpoints,
                        profile=profile_name, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print((out / "table.md").read_text())
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out / 'table.md'}, {out / 'report.md'}, "
          f"{out / 'results.csv'}, {out / 'results.json'}, plots {', '.join(summary.get('plots', []))}")
    return 0

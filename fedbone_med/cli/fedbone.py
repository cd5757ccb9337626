"""``fedbone``: run federations and experiments from data-only configuration."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from .common import main_wrapper


def _run(args: argparse.Namespace) -> int:
    from ..config import ExperimentConfig, load_experiment
    from ..configtools import deep_merge, from_mapping, to_plain
    from ..data.manifest import DATA_ROOT_ENV
    from ..errors import ConfigError
    from ..experiments.federation import Federation, format_table, verify_logs

    if args.data_root is not None:  # read by every manifest, in this process and in the site processes it starts
        if not args.data_root.is_dir():
            raise ConfigError(f"--data-root {args.data_root}: not a directory")
        os.environ[DATA_ROOT_ENV] = str(args.data_root.resolve())
    cfg = load_experiment(args.experiment)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("steps_per_round", args.steps)) if v is not None}
    if overrides:
        cfg = from_mapping(ExperimentConfig, deep_merge(to_plain(cfg), overrides), where="experiment")
    out = Path(args.out)
    print(
        f"fedbone {__version__}: experiment '{cfg.name}', {len(cfg.sites)} sites, {cfg.rounds} rounds x "
        f"{cfg.steps_per_round} steps, aggregation '{cfg.server.aggregation.method}', backbone "
        f"'{cfg.server.backbone.name}'",
        file=sys.stderr,
    )
    if args.transport == "grpc":
        from ..experiments.networked import run_networked

        print(f"transport: gRPC with mutual TLS on loopback; a server process and {len(cfg.sites)} site "
              f"processes (logs in {out / 'logs'})", file=sys.stderr)
        results = run_networked(cfg, out, resume=args.resume, threads=args.threads, quiet=args.quiet)
        print(format_table(results))
        audit = results["audit"]
        print(f"\naudit: server log verified ({audit['server']})")
        for name, verdict in audit["sites"].items():
            print(f"audit: site {name}'s own log {verdict}")
        print(f"\nresults: {out / 'results.json'}    server checkpoint: {out / 'server' / 'checkpoints'}    "
              f"audit log: {out / 'server' / 'audit' / 'server.jsonl'}")
        if args.json:
            print(json.dumps(results["final"], indent=2))
        return 0
    fed = Federation(cfg, out)

    def on_round(record: dict) -> None:
        if args.quiet:
            return
        parts = []
        for name, m in record["sites"].items():
            if "stopped" in m:
                parts.append(f"{name}: stopped")
                continue
            eps = f" (eps {m['epsilon']:.2f})" if "epsilon" in m else ""
            parts.append(f"{name}: {m['primary']:.3f}{eps}")
        # tqdm.write keeps the line above the progress bar instead of inside it
        tqdm.write(f"round {record['round']}: " + ", ".join(parts) + f"  ({record['seconds']:.1f} s)", file=sys.stderr)

    results = fed.run(resume=args.resume, progress=not args.quiet, on_round=on_round)
    print(format_table(results))
    if fed.audit_enabled:
        audit = verify_logs(cfg, out, out / "sites")
        print(f"\naudit: server log verified ({audit['server']})")
        for name, verdict in audit["sites"].items():
            print(f"audit: site {name}'s own log {verdict}")
    print(f"\nresults: {out / 'results.json'}    checkpoints: {out / 'checkpoints'}")
    if args.json:
        print(json.dumps(results["final"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedbone", description="FedBone federated multi-task learning for ophthalmic imaging."
    )
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")

    run = sub.add_parser("run", help="run a federation in one process from an experiment TOML")
    run.add_argument("experiment", help="experiment file, e.g. pipelines/demo.toml")
    run.add_argument("--out", required=True, help="output directory (results.json, checkpoints/)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    run.add_argument("--rounds", type=int, help="override the number of rounds")
    run.add_argument("--steps", type=int, help="override steps per round")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    run.add_argument("--json", action="store_true", help="also print the final metrics as JSON")
    run.add_argument("--transport", choices=["inprocess", "grpc"], default="inprocess",
                     help="inprocess: one process (default); grpc: a server and one process per site on "
                          "loopback, mutual TLS")
    run.add_argument("--threads", type=int, default=1, help="torch threads per process with --transport grpc")
    run.add_argument("--data-root", type=Path, help="folder holding the real datasets the sites' manifests name "
                     "(else $FEDBONE_DATA_ROOT, else ../shared/data); passed on to every site process")
    run.set_defaults(func=_run)

    from .reproduce import add_parser as add_reproduce

    add_reproduce(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""``fedbone-site``: what a hospital site administrator runs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from .common import main_wrapper


def _validate(args: argparse.Namespace) -> int:
    from ..config import load_site
    from ..data.sources import PHANTOM_TASKS, check_task_fits

    cfg = load_site(args.config)
    if cfg.data.source == "phantom" and cfg.data.task in PHANTOM_TASKS:
        check_task_fits(cfg, PHANTOM_TASKS[cfg.data.task])
    print(
        f"{args.config}: valid. site '{cfg.name}' ({cfg.modality}), {cfg.task.type} task "
        f"'{cfg.data.task}' with {cfg.task.num_classes} classes, head '{cfg.model.head}', "
        f"embedding '{cfg.model.embedding}' (stride {cfg.model.stride})"
    )
    return 0


def _check_data(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..config import load_site
    from ..data.check import check_site_data
    from ..errors import DataError

    report = check_site_data(load_site(args.config), data_root=args.data_root)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    if report.errors:
        where = "the ERRORS listing above" + (f" and {args.json}" if args.json else "")
        site = report.stats.get("site")
        raise DataError(f"check-data found {len(report.errors)} error(s) in site '{site}'; see {where}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_site
    from ..crypto.kits import SiteKit
    from ..site.networked import NetworkedSite
    from ..transport.grpc_client import check_kit_certificate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_root:
        os.environ["FEDBONE_DATA_ROOT"] = str(Path(args.data_root).resolve())
    cfg = load_site(args.config)
    kit = SiteKit.load(args.kit)
    if not args.insecure_dev:  # an expired or mismatched kit stops here, before the data is loaded
        check_kit_certificate(kit.ca_pem, kit.cert_pem, kit.key_pem)  # (the site warns of an expiry soon)
    site = NetworkedSite(cfg, kit, args.out, address=args.server,
                         reconnect_timeout=args.reconnect_timeout, progress=not args.quiet,
                         server_name=args.server_name, insecure_dev=args.insecure_dev)
    results = site.run(resume=args.resume)
    last = results["rounds"][-1] if results["rounds"] else {}
    key = results["primary_metric"]
    print(f"site '{cfg.name}': {len(results['rounds'])} round(s); last {key} {last.get(key, float('nan')):.3f}"
          + (f"; stopped: {results['stopped']['reason']}" if results["stopped"] else ""))
    print(f"site results: {site.out / 'site-results.json'}    checkpoint: {site.ckpt_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-site", description="Run a FedBone hospital site.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    v = sub.add_parser("validate-config", help="check a site configuration file and report every problem")
    v.add_argument("config", help="site file, e.g. sites/phantom-vessels.toml")
    v.set_defaults(func=_validate)
    t = sub.add_parser("train", help="join a federation server and train this site")
    t.add_argument("--config", required=True, help="site file, e.g. sites/phantom-vessels.toml")
    t.add_argument("--kit", required=True, help="this site's startup kit (from `fedbone-server provision`)")
    t.add_argument("--out", required=True, help="output directory: checkpoints/, site-results.json")
    t.add_argument("--server", help="HOST:PORT of the server (default: the kit's server-address.txt)")
    t.add_argument("--server-name", default="localhost",
                   help="the name the server's certificate is for (`fedbone-server provision --server-name`; "
                        "default localhost); a mismatch stops the site at once with the certificate's names")
    t.add_argument("--resume", action="store_true", help="start from this site's checkpoint in --out")
    t.add_argument("--reconnect-timeout", type=float, default=600.0,
                   help="seconds to keep retrying an unreachable server (default 600); a failed TLS "
                        "certificate check is not retried: it stops the site at once (exit code 11)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--data-root", help="where relative dataset roots in manifests resolve "
                                       "(default: $FEDBONE_DATA_ROOT, else ../shared/data)")
    t.add_argument("--insecure-dev", action="store_true",
                   help="development only: connect without TLS (loopback only); frames are still sealed")
    t.set_defaults(func=_train)
    c = sub.add_parser("check-data", help="check every image and label before training")
    c.add_argument("--config", required=True, help="site file, e.g. sites/chase-db1-vessels.toml")
    c.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder that holds the dataset folders named by relative manifest roots "
        "(default: $FEDBONE_DATA_ROOT, else ../shared/data beside the checkout)",
    )
    c.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE")
    c.set_defaults(func=_check_data)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

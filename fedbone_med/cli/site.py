"""``fedbone-site``: what a hospital site administrator runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .common import main_wrapper, not_yet


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbone-site", description="Run a FedBone hospital site.")
    p.add_argument("--version", action="version", version=f"fedbone-med {__version__}")
    sub = p.add_subparsers(title="commands")
    v = sub.add_parser("validate-config", help="check a site configuration file and report every problem")
    v.add_argument("config", help="site file, e.g. sites/phantom-vessels.toml")
    v.set_defaults(func=_validate)
    t = sub.add_parser("train", help="join a federation server and train this site")
    t.add_argument("--config", required=True)
    t.set_defaults(func=not_yet("fedbone-site train over the network", "the networked federation issue"))
    c = sub.add_parser("check-data", help="check every image and label before training")
    c.add_argument("--config", required=True)
    c.set_defaults(func=not_yet("fedbone-site check-data", "the site data pipelines issue"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return main_wrapper(build_parser, argv)

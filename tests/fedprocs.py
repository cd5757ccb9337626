"""A provisioned federation of real processes on loopback, for tests that start, kill and restart them.

Each party is a separate Python process (``python -m fedbone_med.cli.server serve``,
``python -m fedbone_med.cli.site train``) with one torch thread, mutual TLS with certificates from
``provision``, and its own output directory under the test's ``tmp_path``. ``replay_backbone``
computes, in one process, the backbone that the same experiment gives when the sites take part
in exactly the steps the server's results record: the reference a faulted run must equal.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedbone_med.config import ExperimentConfig, load_experiment
from fedbone_med.experiments.networked import write_configs
from fedbone_med.server.networked import wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SITES = ("fundus-dr", "fundus-vessels", "oct-edema")


def experiment(tmp: Path, rounds: int = 2, steps: int = 2, network: str = "", private: bool = False,
               aggregation: str = "") -> Path:
    """Three phantom sites (two fundus, one OCT) on the tiny Swin backbone, 32 px: seconds per round.

    ``aggregation``: lines for ``[server.aggregation]`` (e.g. ``cadence = "round"``)."""
    third = "phantom-oct-edema-private.toml" if private else "phantom-oct-edema.toml"
    exp = tmp / "exp.toml"
    exp.write_text(f"""
name = "net"
seed = 3
rounds = {rounds}
steps_per_round = {steps}
[server.backbone]
name = "swin-tiny"
embed_dim = 16
depths = [1, 1, 1, 1]
num_heads = [1, 2, 2, 4]
window_size = 4
[server.aggregation]
{aggregation}
[network]
{network}
[[sites]]
config = "{ROOT / 'sites' / 'phantom-dr.toml'}"
[[sites]]
config = "{ROOT / 'sites' / 'phantom-vessels.toml'}"
[[sites]]
config = "{ROOT / 'sites' / third}"
[site_overrides.data]
image_size = 32
n_train = 12
n_val = 8
[site_overrides.train]
batch_size = 4
eval_batch_size = 8
[site_overrides.model]
adapt_dim = 16
adapt_heads = 2
""")
    return exp


def backbone(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["backbone"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Fed:
    """A provisioned federation whose processes the test starts, kills and restarts."""

    def __init__(self, tmp: Path, exp: Path) -> None:
        from fedbone_med.crypto.provision import provision

        self.tmp = tmp
        self.cfg: ExperimentConfig = load_experiment(exp)
        provision(tmp / "provision", [s.name for s in self.cfg.sites], server_address="127.0.0.1:50051")
        self.server_toml, self.site_files = write_configs(self.cfg, tmp)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.server_dir = tmp / "server"

    def start_server(self, resume: bool = False, wait: bool = True) -> None:
        port_file = self.tmp / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fedbone_med.cli.server", "serve", "--config", str(self.server_toml),
               "--kit", str(self.tmp / "provision"), "--out", str(self.server_dir),
               "--address", f"127.0.0.1:{self.port}", "--port-file", str(port_file), "--progress", "lines"]
        log = open(self.tmp / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs["server"] = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=log,
                                                stderr=subprocess.STDOUT, env=env())
        if wait:
            wait_for_port(port_file, self.procs["server"])

    def start_site(self, name: str, resume: bool = False) -> None:
        cmd = [sys.executable, "-m", "fedbone_med.cli.site", "train", "--config", str(self.site_files[name]),
               "--kit", str(self.tmp / "provision" / "sites" / name), "--out", str(self.site_dir(name)),
               "--server", f"127.0.0.1:{self.port}", "--quiet", "--reconnect-timeout", "120"]
        log = open(self.tmp / f"site-{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=log,
                                            stderr=subprocess.STDOUT, env=env())

    def site_dir(self, name: str) -> Path:
        return self.tmp / "sites" / name

    def server_results(self) -> dict[str, Any]:
        return json.loads((self.server_dir / "server-results.json").read_text())

    def server_rounds(self) -> list[dict]:
        try:
            return list(self.server_results()["rounds"])
        except (OSError, ValueError):
            return []

    def server_step(self) -> int:
        """The last step the server reported aggregated (its ``progress STEP TOTAL`` lines)."""
        try:
            lines = (self.tmp / "server.log").read_text(errors="replace").splitlines()
        except OSError:
            return 0
        steps = [int(line.split()[1]) for line in lines if line.startswith("progress ") and len(line.split()) == 3]
        return steps[-1] if steps else 0

    def until(self, what: str, cond: Callable[[], bool], timeout: float = 300, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.logs()}"
            server = self.procs.get("server")
            assert server is None or server.poll() is None, f"the server exited waiting for {what}:\n{self.logs()}"
            time.sleep(poll)

    def wait_rounds(self, n: int, timeout: float = 300) -> None:
        self.until(f"{n} round(s)", lambda: len(self.server_rounds()) >= n, timeout)

    def wait(self, name: str, timeout: float = 300) -> int:
        return self.procs[name].wait(timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    # -- what an auditor and a reviewer check at the end of every case ---------------------------------
    def audit_everything(self) -> dict[str, Any]:
        """``fedbone-audit verify --require-ended`` on the server's log and on every site's, and
        ``cross-check`` of every site's log against the server's. Returns the cross-check reports."""
        from fedbone_med.audit import load_public_keys
        from fedbone_med.audit.crosscheck import cross_check
        from fedbone_med.cli import audit

        server_log = self.server_dir / "audit" / "server.jsonl"
        server_key = self.server_dir / "keys" / "server-audit-key.pub.pem"
        assert audit.main(["verify", str(server_log), "--public-key", str(server_key), "--require-ended"]) == 0
        reports = {}
        for site in self.cfg.sites:
            d = self.site_dir(site.name)
            site_log, site_key = d / "audit" / "site.jsonl", d / "keys" / f"site-{site.name}-audit-key.pub.pem"
            assert audit.main(["verify", str(site_log), "--public-key", str(site_key), "--require-ended"]) == 0
            reports[site.name] = cross_check(server_log, site_log, server_keys=load_public_keys([server_key]),
                                             site_keys=load_public_keys([site_key]))
        return reports


def replay_backbone(cfg: ExperimentConfig, results: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone of ``cfg`` trained in one process with each site taking part in exactly the steps
    and round reports that the server's ``results`` (``server-results.json``) record.

    A site that leaves mid-round comes back, as ``fedbone-site train --resume`` does, with the state
    of its last completed round (its checkpoint); one that is absent keeps its state. With every site
    in every step this is the uninterrupted run.
    """
    from fedbone_med.data.sources import load_site_data
    from fedbone_med.server import Coordinator
    from fedbone_med.site import SiteRuntime, derive_seed
    from fedbone_med.transport import InProcessTransport

    torch.set_num_threads(1)  # as each process of the federation
    coordinator = Coordinator(cfg.server, run_id="replay", seed=cfg.seed, embedding_fedavg=cfg.embedding_fedavg)
    sites = {s.name: SiteRuntime(s, InProcessTransport(coordinator), load_site_data(s),
                                 seed=derive_seed(cfg.seed, s.name)) for s in cfg.sites}
    members: set[str] = set()
    completed: dict[str, dict[str, Any]] = {}  # site -> state at the end of its last completed round
    for name, site in sites.items():
        site.join()
        members.add(name)
        completed[name] = copy.deepcopy(site.state_dict())  # state_dict() holds the live tensors
    by_step = {a["step"]: set(a["site_names"]) for a in results["aggregation"]}
    reported = {r["round"]: set(r["sites"]) for r in results["rounds"]}
    steps = cfg.steps_per_round
    for rnd in range(cfg.rounds):
        for i in range(steps):
            step = rnd * steps + i
            present = by_step.get(step, set())
            if not present:  # skipped (fewer than min_sites delivered): the server moved on
                coordinator.step = step + 1
            for name in sorted(members - present):
                sites[name].leave()
                members.discard(name)
            for name in sorted(present - members):
                sites[name].join()
                sites[name].load_state_dict(completed[name])
                members.add(name)
            for name in sorted(present):
                sites[name].train_step(rnd, step, i)
        for name in sorted(members - reported.get(rnd, set())):
            sites[name].leave()
            members.discard(name)
        for name in sorted(members):
            sites[name].end_round(rnd, {}, cfg.embedding_fedavg)
        for name in sorted(members):
            sites[name].sync_round(rnd)
            completed[name] = copy.deepcopy(sites[name].state_dict())
    return {k: v.detach().clone() for k, v in coordinator.backbone.state_dict().items()}

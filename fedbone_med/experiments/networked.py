"""``fedbone run --transport grpc``: a real local federation, one process per party, on loopback.

``run_networked`` provisions a project CA, a server certificate and one startup kit per site
(``OUT/provision``), writes the effective server and site configurations as TOML (``OUT/server.toml``,
``OUT/sites/NAME.toml``: what an operator would run by hand), starts ``fedbone-server serve`` and one
``fedbone-site train`` per site as separate processes talking gRPC with mutual TLS and the sealed
envelope over 127.0.0.1, relays the server's per-round lines, and merges what each process wrote into
``OUT/results.json`` in the same shape as the in-process runner's (so ``format_table`` prints it).

Each process uses ``threads`` torch threads (default 1): several processes each spinning a full
OpenMP pool on a small machine slow every one of them down many times over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from .. import __version__
from ..checkpoint import write_json_atomic
from ..config import ExperimentConfig, ServeConfig
from ..configtools import config_hash, to_plain, to_toml
from ..errors import FedboneError, ProtocolError
from ..perf import machine_info
from ..server.networked import wait_for_port
from .federation import verify_logs


class NetworkedRunError(FedboneError):
    exit_code = 6


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _relay(stream: IO[str], log: IO[str], quiet: bool) -> None:
    """The server's output: into its log; round lines above a progress bar drawn from its progress lines."""
    bar: tqdm | None = None
    try:
        for line in stream:
            if line.startswith("progress "):
                if quiet:
                    continue
                done, total = (int(x) for x in line.split()[1:3])
                if bar is None:
                    bar = tqdm(total=total, unit="step", desc="federation", file=sys.stderr, leave=False)
                bar.update(done - bar.n)
                continue
            log.write(line)
            log.flush()
            if not quiet and (line.startswith(("round ", "fedbone-server", "all ", "join timeout"))
                              or "error" in line.lower()):
                tqdm.write(line.rstrip("\n"), file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def write_configs(cfg: ExperimentConfig, out: Path) -> tuple[Path, dict[str, Path]]:
    """The effective server and site configurations, as TOML files in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    server_toml = out / "server.toml"
    server_toml.write_text(to_toml(to_plain(ServeConfig.of(cfg)),
                                   header=f"fedbone-server configuration written by fedbone run (experiment "
                                          f"'{cfg.name}')"))
    site_files = {}
    (out / "sites").mkdir(exist_ok=True)
    for s in cfg.sites:
        path = out / "sites" / f"{s.name}.toml"
        path.write_text(to_toml(to_plain(s), header=f"site '{s.name}' as configured by experiment '{cfg.name}'"))
        site_files[s.name] = path
    return server_toml, site_files


def run_networked(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False, threads: int = 1,
                  server_threads: int | None = None, quiet: bool = False, timeout: float | None = None) -> dict:
    """Run ``cfg`` as a server process and one process per site on loopback; return the merged results."""
    from ..crypto.provision import provision

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in cfg.sites]
    kit_root = out / "provision"
    if not (kit_root / "ca" / "ca.pem").exists():
        provision(kit_root, names, server_name="localhost", server_address=cfg.network.address)
    elif not resume:
        raise NetworkedRunError(f"{out} already holds a run (provision/); use --resume or a new --out directory")
    server_toml, site_files = write_configs(cfg, out)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    port_file = out / "server.port"
    port_file.unlink(missing_ok=True)
    py = sys.executable
    server_cmd = [py, "-m", "fedbone_med.cli.server", "serve", "--config", str(server_toml), "--kit", str(kit_root),
                  "--out", str(out / "server"), "--address", "127.0.0.1:0", "--port-file", str(port_file),
                  "--progress", "lines"]
    if resume:
        server_cmd.append("--resume")
    procs: dict[str, subprocess.Popen[str]] = {}
    relays: list[threading.Thread] = []
    log_files: list[IO[str]] = []
    started = time.monotonic()
    try:
        server_log = open(logs / "server.log", "w")  # noqa: SIM115 - closed in finally
        log_files.append(server_log)
        server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=_child_env(server_threads or threads))
        procs["server"] = server
        assert server.stdout is not None
        t = threading.Thread(target=_relay, args=(server.stdout, server_log, quiet), daemon=True)
        t.start()
        relays.append(t)
        port = wait_for_port(port_file, server)
        for name in names:
            cmd = [py, "-m", "fedbone_med.cli.site", "train", "--config", str(site_files[name]),
                   "--kit", str(kit_root / "sites" / name), "--out", str(out / "sites" / name),
                   "--server", f"127.0.0.1:{port}", "--quiet"]
            if resume:
                cmd.append("--resume")
            log = open(logs / f"site-{name}.log", "w")  # noqa: SIM115 - closed in finally
            log_files.append(log)
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                           env=_child_env(threads))
        failed: dict[str, int] = {}
        running = dict(procs)
        while running:  # a process that fails stops the whole run at once (nobody waits for a deadline)
            for name, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    failed[name] = code
            if failed:
                for proc in running.values():
                    proc.send_signal(signal.SIGINT)  # the others leave / stop cleanly
                for proc in running.values():
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                break
            if timeout is not None and time.monotonic() - started > timeout:
                raise NetworkedRunError(f"the federation did not finish within {timeout:.0f} s")
            time.sleep(0.2)
        for t in relays:
            t.join(timeout=5.0)
        if failed:
            def log_of(n: str) -> Path:
                return logs / ("server.log" if n == "server" else f"site-{n}.log")

            details = "\n".join(f"  {n} exited with code {c}; last lines of {log_of(n)}:\n{_tail(log_of(n))}"
                                for n, c in failed.items())
            raise NetworkedRunError(f"{len(failed)} process(es) failed:\n{details}")
    except KeyboardInterrupt:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in log_files:
            f.close()
    results = merge_results(cfg, out)
    results["machine"]["torch_threads"] = threads  # each site process's (this process did not train)
    results["machine"]["server_torch_threads"] = server_threads or threads
    results["seconds"] = time.monotonic() - started
    results["audit"] = verify_logs(cfg, out / "server", out / "sites")  # raises AuditError if the server's fails
    write_json_atomic(results, out / "results.json")
    return results


def merge_results(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """One results.json (the in-process runner's shape) from the server's and the sites' own results."""
    try:
        server = json.loads((out / "server" / "server-results.json").read_text())
        sites = {s.name: json.loads((out / "sites" / s.name / "site-results.json").read_text()) for s in cfg.sites}
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"cannot merge the results in {out}: {exc}") from None
    info_keys = ("modality", "task", "task_type", "primary_metric", "n_train", "n_val", "site_parameters", "split")
    rounds = []
    for record in server["rounds"]:
        r = record["round"]
        per_site: dict[str, Any] = {}
        for name, res in sites.items():
            mine = [x for x in res["rounds"] if x["round"] == r]
            if mine:
                per_site[name] = {k: v for k, v in mine[0].items() if k not in ("round", "seconds")}
        for name, res in sites.items():
            if res["stopped"] is not None and name not in per_site:
                per_site[name] = {"stopped": res["stopped"]}
        rounds.append({"round": r, "sites": per_site, "seconds": record["seconds"]})
    final = {}
    for record in rounds:
        for name, m in record["sites"].items():
            if "stopped" not in m:
                final[name] = m
    return {
        "experiment": cfg.name,
        "run_id": server["run_id"],
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "software_version": __version__,
        "machine": machine_info(),
        "transport": "grpc",
        "config": to_plain(cfg),
        "sites": {name: {k: res[k] for k in info_keys} for name, res in sites.items()},
        "backbone_parameters": server["backbone_parameters"],
        "rounds": rounds,
        "aggregation": server["aggregation"],
        "events": server["events"],
        "reconnects": {name: res["reconnects"] for name, res in sites.items()},
        "stopped": {name: res["stopped"] for name, res in sites.items() if res["stopped"] is not None},
        "final": final,
    }

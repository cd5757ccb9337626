"""One site training step through the in-process split against the monolithic model.

    python benchmarks/split_step.py --out FILE.json [--repeats N] [--batch B] [--size S]

Both sides train the same model (the demo's swin-tiny backbone and a site of the given
task) on the same batch, each with its own AdamW state. The split step is the real
protocol: site embedding -> coordinator forward -> site head -> coordinator backward into
the site's gradient slot -> aggregation (K = 1) -> backbone and site optimizer steps. The
monolithic step is forward, loss, backward and one optimizer step over all parameters.
Timings alternate between the two (to share machine drift) and report medians.

Headline key: ``inprocess_vs_monolithic_throughput_ratio`` (split steps/s over
monolithic steps/s; goal >= 0.95).

The networked case runs the same split step for one site over gRPC on loopback with mutual
TLS (certificates from ``provision``) and the sealed envelope, the server in a thread of this
process (so both arms have the same CPU threads), alternating with the in-process step:
``grpc_vs_inprocess_throughput_ratio`` (goal >= 0.85). ``bytes_per_step_per_site`` counts the
sealed frames of one training step (z up, F down, dF up, dz down) with float32 and float16 on
the wire. ``envelope_seal_open_gbps`` is seal + open throughput of one session pair on a 64 MiB
float32 tensor.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedbone_med.config import (
    BackboneConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ServerConfig,
    SiteConfig,
    TaskConfig,
    TrainConfig,
)
from fedbone_med.data.sources import ArraySplit, SiteData
from fedbone_med.models import FedBoneModel, TaskLoss
from fedbone_med.perf import tune_allocator
from fedbone_med.server import Coordinator
from fedbone_med.site import SiteRuntime
from fedbone_med.transport import InProcessTransport

TASKS = {
    "segmentation": TaskConfig(type="segmentation", num_classes=1, mode="binary"),
    "classification": TaskConfig(type="classification", num_classes=5, ordinal=True),
}


def bench_task(kind: str, batch: int, size: int, repeats: int, backbone: str) -> dict:
    task = TASKS[kind]
    cfg = SiteConfig(
        name=f"bench-{kind}",
        modality="fundus",
        data=DataConfig(task="vessels" if kind == "segmentation" else "dr_grade", image_size=size),
        task=task,
        model=ModelConfig(head=kind),
        train=TrainConfig(batch_size=batch),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    if kind == "segmentation":
        y = (torch.rand(batch, 1, size, size, generator=g) > 0.8).float()
    else:
        y = torch.randint(0, 5, (batch,), generator=g)
    data = SiteData(ArraySplit(x, y), ArraySplit(x, y))

    server = ServerConfig(backbone=BackboneConfig(name=backbone), optimizer=OptimizerConfig(lr=1e-4))
    coord = Coordinator(server, run_id="bench", seed=0, embedding_fedavg=False)
    site = SiteRuntime(cfg, InProcessTransport(coord), data, seed=0)
    site.join()
    mono = FedBoneModel(copy.deepcopy(site.model), copy.deepcopy(coord.backbone))
    mono_opt = torch.optim.AdamW(mono.parameters(), lr=1e-4)
    loss_fn = TaskLoss(task)

    def split_step(i: int) -> None:
        site.train_step(0, i, 0)

    def mono_step(i: int) -> None:
        mono_opt.zero_grad(set_to_none=True)
        loss_fn(mono(x), y).backward()
        mono_opt.step()

    for i in range(3):  # warm-up (allocator, first-call overheads)
        split_step(i)
        mono_step(i)
    t_split, t_mono = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        split_step(3 + i)
        t1 = time.perf_counter()
        mono_step(3 + i)
        t2 = time.perf_counter()
        t_split.append(t1 - t0)
        t_mono.append(t2 - t1)
    s, m = statistics.median(t_split), statistics.median(t_mono)
    return {
        "task": kind,
        "batch": batch,
        "image_size": size,
        "split_step_s": s,
        "monolithic_step_s": m,
        "throughput_ratio": m / s,
        "site_parameters": sum(p.numel() for p in site.model.parameters()),
        "backbone_parameters": coord.num_params,
    }


def _site_cfg(kind: str, batch: int, size: int) -> SiteConfig:
    return SiteConfig(
        name="bench",
        modality="fundus",
        data=DataConfig(task="vessels" if kind == "segmentation" else "dr_grade", image_size=size),
        task=TASKS[kind],
        model=ModelConfig(head=kind),
        train=TrainConfig(batch_size=batch),
    )


def bench_grpc(kind: str, batch: int, size: int, repeats: int, backbone: str) -> dict:
    """The split step over gRPC + mutual TLS + envelope (loopback) against the in-process transport."""
    import tempfile

    from fedbone_med.audit.ledger import FrameLedger
    from fedbone_med.crypto.kits import ServerKit, SiteKit
    from fedbone_med.crypto.provision import provision
    from fedbone_med.transport.grpc_client import GrpcTransport
    from fedbone_med.transport.grpc_service import bound_port, serve

    cfg = _site_cfg(kind, batch, size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.8).float() if kind == "segmentation" else \
        torch.randint(0, 5, (batch,), generator=g)
    data = SiteData(ArraySplit(x, y), ArraySplit(x, y))
    server_cfg = ServerConfig(backbone=BackboneConfig(name=backbone), optimizer=OptimizerConfig(lr=1e-4))
    out: dict = {"task": kind, "batch": batch, "image_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        provision(Path(tmp) / "pki", ["bench"])
        skit, kit = ServerKit.load(Path(tmp) / "pki"), SiteKit.load(Path(tmp) / "pki" / "sites" / "bench")
        for wire_name, wire_dtype in (("float32", None), ("float16", torch.float16)):
            coord_g = Coordinator(server_cfg, run_id="bench", seed=0, embedding_fedavg=False)
            coord_i = Coordinator(server_cfg, run_id="bench", seed=0, embedding_fedavg=False)
            server = serve(coord_g, address="127.0.0.1:0", server_key_pem=skit.key_pem, server_cert_pem=skit.cert_pem,
                           ca_pem=skit.ca_pem, registry_dir=skit.root, identity_key=skit.identity_key,
                           site_keys=skit.site_keys, wire_dtype=wire_dtype)
            ledger = FrameLedger()
            transport = GrpcTransport("bench", f"127.0.0.1:{bound_port(server)}", ca_pem=kit.ca_pem,
                                      cert_pem=kit.cert_pem, key_pem=kit.key_pem, identity_key=kit.identity_key,
                                      server_public_key=kit.server_identity, ledger=ledger)
            transport.wire_dtype = wire_dtype
            try:
                site_g = SiteRuntime(cfg, transport, data, seed=0)
                site_g.join()
                site_i = SiteRuntime(cfg, InProcessTransport(coord_i), data, seed=0)
                site_i.join()
                for i in range(3):  # warm-up
                    site_g.train_step(0, i, 0)
                    site_i.train_step(0, i, 0)
                before = ledger.summary(0)
                t_g, t_i = [], []
                for i in range(repeats):
                    t0 = time.perf_counter()
                    site_g.train_step(0, 3 + i, 0)
                    t1 = time.perf_counter()
                    site_i.train_step(0, 3 + i, 0)
                    t2 = time.perf_counter()
                    t_g.append(t1 - t0)
                    t_i.append(t2 - t1)
                after = ledger.summary(0)
                sent = (after["up"]["bytes"] - before["up"]["bytes"]) / repeats
                received = (after["down"]["bytes"] - before["down"]["bytes"]) / repeats
            finally:
                transport.close()
                server.stop(0)
            out[f"bytes_per_step_{wire_name}"] = {"up": sent, "down": received, "total": sent + received}
            if wire_dtype is None:
                out["grpc_step_s"] = statistics.median(t_g)
                out["inprocess_step_s"] = statistics.median(t_i)
                out["throughput_ratio"] = out["inprocess_step_s"] / out["grpc_step_s"]
            else:
                out["grpc_fp16_step_s"] = statistics.median(t_g)
    return out


def bench_envelope(mib: int = 64, repeats: int = 5) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedbone_med.crypto.envelope import Expect
    from fedbone_med.crypto.frame import FrameHeader
    from fedbone_med.crypto.handshake import ClientHandshake, ServerHandshake
    from fedbone_med.transport.wire import KIND_OF

    site_key, server_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    client = ClientHandshake(site_key, server_key.public_key(), "bench", "s", max_payload_bytes=(mib + 1) << 20)
    hello, server_session = ServerHandshake(server_key, site_key.public_key(), "bench", "s",
                                            max_payload_bytes=(mib + 1) << 20).respond(client.hello())
    client_session = client.finish(hello)
    t = torch.randn(mib << 18)  # mib MiB of float32
    times = []
    for step in range(repeats + 1):
        header = FrameHeader(run_id="bench", round=0, step=step, site="s", kind=KIND_OF["forward"])
        t0 = time.perf_counter()
        blob = client_session.seal(header, [t])
        server_session.open(blob, Expect(kind=KIND_OF["forward"]))
        if step:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"payload_mib": mib, "seal_open_s": s, "gbps": (mib << 20) * 8 / s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbone", default="swin-tiny")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="measure with glibc's default allocator settings")
    ap.add_argument("--no-grpc", action="store_true", help="skip the networked case")
    args = ap.parse_args()
    tuned = False if args.no_malloc_tuning else tune_allocator()  # process-wide: both arms share it
    torch.manual_seed(0)
    cases = [bench_task(k, args.batch, args.size, args.repeats, args.backbone) for k in TASKS]
    ratio = statistics.mean(c["throughput_ratio"] for c in cases)
    grpc_cases = [] if args.no_grpc else [bench_grpc(k, args.batch, args.size, args.repeats, args.backbone)
                                          for k in TASKS]
    envelope = None if args.no_grpc else bench_envelope()
    result = {
        "inprocess_vs_monolithic_throughput_ratio": ratio,
        "goal": ">= 0.95",
        "allocator_tuned": tuned,
        "cases": cases,
        "grpc_cases": grpc_cases,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    print(f"{'task':<16}{'batch':>6}{'size':>6}{'split s':>10}{'mono s':>10}{'ratio':>8}")
    for c in cases:
        print(f"{c['task']:<16}{c['batch']:>6}{c['image_size']:>6}{c['split_step_s']:>10.4f}"
              f"{c['monolithic_step_s']:>10.4f}{c['throughput_ratio']:>8.3f}")
    print(f"inprocess_vs_monolithic_throughput_ratio = {ratio:.3f} (goal >= 0.95)")
    if grpc_cases:
        g_ratio = statistics.mean(c["throughput_ratio"] for c in grpc_cases)
        result["grpc_vs_inprocess_throughput_ratio"] = g_ratio
        result["grpc_goal"] = ">= 0.85"
        result["bytes_per_step_per_site"] = {c["task"]: {"float32": c["bytes_per_step_float32"]["total"],
                                                         "float16": c["bytes_per_step_float16"]["total"]}
                                             for c in grpc_cases}
        result["envelope_seal_open_gbps"] = envelope["gbps"] if envelope else None
        result["envelope"] = envelope
        print(f"\n{'task (gRPC, mTLS, envelope)':<30}{'grpc s':>9}{'inproc s':>10}{'ratio':>8}{'MB/step fp32':>14}"
              f"{'fp16':>8}")
        for c in grpc_cases:
            mb32, mb16 = c["bytes_per_step_float32"]["total"] / 1e6, c["bytes_per_step_float16"]["total"] / 1e6
            print(f"{c['task']:<30}{c['grpc_step_s']:>9.4f}{c['inprocess_step_s']:>10.4f}{c['throughput_ratio']:>8.3f}"
                  f"{mb32:>14.2f}{mb16:>8.2f}")
        print(f"grpc_vs_inprocess_throughput_ratio = {g_ratio:.3f} (goal >= 0.85)")
        assert envelope is not None
        print(f"envelope_seal_open_gbps = {envelope['gbps']:.2f} ({envelope['payload_mib']} MiB, seal + open)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

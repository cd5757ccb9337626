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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--backbone", default="swin-tiny")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="measure with glibc's default allocator settings")
    args = ap.parse_args()
    tuned = False if args.no_malloc_tuning else tune_allocator()  # process-wide: both arms share it
    torch.manual_seed(0)
    cases = [bench_task(k, args.batch, args.size, args.repeats, args.backbone) for k in TASKS]
    ratio = statistics.mean(c["throughput_ratio"] for c in cases)
    result = {
        "inprocess_vs_monolithic_throughput_ratio": ratio,
        "goal": ">= 0.95",
        "allocator_tuned": tuned,
        "cases": cases,
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

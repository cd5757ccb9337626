"""Images per second through a site's data pipeline against what its training step consumes.

    python benchmarks/pipeline.py --out FILE.json [--quick] [--site sites/chase-db1-vessels.toml]
        [--size 256] [--batch B] [--train-batch 16] [--loader-threads 2,1] [--train-threads 2,1]
        [--data-root DIR] [--no-train]

The site's manifest and transform chains are loaded exactly as ``fedbone-site train`` loads
them (``data.pipeline`` + the resize to ``data.image_size``, deterministic; ``data.augment``,
random, per training sample), with ``data.image_size`` set to ``--size``. Loader modes run on
the site's training split in this process (num_workers = 0), once per ``--loader-threads``
count (torch intra-op threads: this process's default, and 1 as in a DataLoader worker):

* ``plain_load`` -- today's load: every sample of both splits read and transformed once
  (``load_site_data``); a one-off cost before the first step.
* ``plain_augment_per_epoch`` -- today's steady state: the materialised tensors through
  ``augment_batch`` (what ``SiteRuntime.train_step`` runs before every step).
* ``monai_dataset_per_epoch`` -- ``monai.data.Dataset`` without caching: read + deterministic
  chain + augmentation for every sample in every epoch (the "without caching" baseline).
* ``cache_dataset_build`` / ``cache_dataset_per_epoch`` -- ``monai.data.CacheDataset``: the
  deterministic chain cached in memory once, then augmentation per epoch (DataLoader batches).
* ``persistent_dataset_cold`` / ``persistent_dataset_warm_per_epoch`` -- ``monai.data
  .PersistentDataset`` (cache on disk in a temporary directory): first epoch computes and
  writes, later epochs read the cache and augment.

Training consumption: the site's real split step (site embedding -> in-process coordinator
with the swin-tiny backbone -> site head, backward, optimizer steps) on the loaded batches,
without augmentation (that is the loader's work), median over timed steps; at the site's batch
size for each ``--train-threads`` count, and at each ``--train-batch`` (default 16; the split is
tiled when it holds fewer images) at the first thread count.

Headline key: ``loader_vs_train_consumption_ratio`` = images/s of today's steady-state path
(``plain_augment_per_epoch`` at the first loader thread count) over the fastest training case
at the first train thread count (goal >= 2, so the loader never starves training). ``ratios``
has the same for every mode and thread count. Both sides measure with the whole machine;
load average before and after is recorded, since other work on the cores changes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Transform

from fedbone_med.config import BackboneConfig, OptimizerConfig, ServerConfig, SiteConfig, load_site
from fedbone_med.data.augment import augment_batch
from fedbone_med.data.manifest import Manifest, Sample, list_samples
from fedbone_med.data.manifest_data import site_chain
from fedbone_med.data.pipeline import load_chain, load_manifest, read_sample
from fedbone_med.data.sources import ArraySplit, SiteData, load_site_data
from fedbone_med.data.transforms import build_transforms
from fedbone_med.perf import tune_allocator

ROOT = Path(__file__).resolve().parent.parent
GOAL = 2.0


class ReadSampled(Transform):
    """MONAI transform: ``{"index": i, ...}`` -> the sample's image and label, read as training reads
    them (``read_sample``; a bad file raises the check-data message). Deterministic, so caching
    datasets cache it."""

    def __init__(self, m: Manifest, samples: Sequence[Sample]) -> None:
        self.m, self.samples = m, list(samples)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return read_sample(self.m, self.samples[int(data["index"])])


def _tail(aug: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Augmentation, then float32 tensors (what a training batch needs)."""
    return [*aug, {"name": "EnsureTyped", "keys": ["image", "label"], "data_type": "tensor",
                   "dtype": "float32", "track_meta": False}]


def _compose(m: Manifest, samples: Sequence[Sample], det: list[dict[str, Any]], aug: list[dict[str, Any]],
             seed: int = 0) -> Any:
    from monai.transforms import Compose

    return Compose([ReadSampled(m, samples), *build_transforms(det).transforms,
                    *build_transforms(_tail(aug), seed=seed).transforms])


def _epochs(loader: Any, epochs: int) -> tuple[float, int]:
    """Seconds and images over ``epochs`` passes of a DataLoader."""
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += int(batch["image"].shape[0])
    return time.perf_counter() - t0, n


def _rate(seconds: float, images: int) -> dict[str, float]:
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def bench_loaders(cfg: SiteConfig, data_root: str | None, epochs: int,
                  repeats: int) -> tuple[dict[str, Any], SiteData]:
    from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

    assert cfg.data.manifest is not None
    m = load_manifest(cfg.data.manifest)
    det = site_chain(cfg, m)
    aug = load_chain(cfg.data.augment) if cfg.data.augment else []
    train = [s for s in list_samples(m, data_root) if s.split == "train"]
    items = [{"index": i, "path": str(s.image)} for i, s in enumerate(train)]
    batch = cfg.train.batch_size
    modes: dict[str, Any] = {}

    # (a) today: read + deterministic chain once per sample (both splits), then augment_batch per step
    times, data = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = load_site_data(cfg, data_root)
        times.append(time.perf_counter() - t0)
    assert data is not None
    n_loaded = len(data.train) + len(data.val)
    modes["plain_load"] = _rate(statistics.median(times), n_loaded)
    chain = data.augment if data.augment is not None else build_transforms([])
    x, y = data.train.images, data.train.targets
    n = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        for start in range(0, len(x), batch):
            augment_batch(chain, cfg.task, x[start:start + batch], y[start:start + batch], seed=e * 1000 + start)
            n += len(x[start:start + batch])
    modes["plain_augment_per_epoch"] = _rate(time.perf_counter() - t0, n)

    # (b) MONAI datasets over the same chains
    def loader(ds: Any) -> Any:
        return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0,
                          generator=torch.Generator().manual_seed(0))

    ds = Dataset(items, transform=_compose(m, train, det, aug))
    modes["monai_dataset_per_epoch"] = _rate(*_epochs(loader(ds), max(1, epochs // 2)))

    t0 = time.perf_counter()
    ds = CacheDataset(items, transform=_compose(m, train, det, aug), cache_rate=1.0, num_workers=0, progress=False)
    modes["cache_dataset_build"] = _rate(time.perf_counter() - t0, len(items))
    modes["cache_dataset_per_epoch"] = _rate(*_epochs(loader(ds), epochs))

    with tempfile.TemporaryDirectory(prefix="fedbone-pipeline-bench-") as tmp:
        ds = PersistentDataset(items, transform=_compose(m, train, det, aug), cache_dir=tmp)
        modes["persistent_dataset_cold"] = _rate(*_epochs(loader(ds), 1))
        cached = len(list(Path(tmp).glob("*.pt")))
        if cached != len(items):
            raise RuntimeError(f"PersistentDataset cached {cached} of {len(items)} samples")
        modes["persistent_dataset_warm_per_epoch"] = _rate(*_epochs(loader(ds), epochs))
    info = {"manifest": m.name, "train_images": len(train), "loaded_images": n_loaded,
            "deterministic_chain": [t["name"] for t in det], "augment_chain": [t["name"] for t in aug]}
    return {"modes": modes, **info}, data


def bench_train(cfg: SiteConfig, data: SiteData, warmup: int, steps: int, backbone: str,
                threads: int) -> dict[str, Any]:
    """The site's split training step (in-process coordinator), augmentation off: pure consumption."""
    from fedbone_med.server import Coordinator
    from fedbone_med.site import SiteRuntime
    from fedbone_med.transport import InProcessTransport

    server = ServerConfig(backbone=BackboneConfig(name=backbone), optimizer=OptimizerConfig(lr=1e-4))
    coord = Coordinator(server, run_id="bench-pipeline", seed=0, embedding_fedavg=False)
    train = data.train
    if len(train) < cfg.train.batch_size:  # the runtime caps a batch at the split's size: tile the split
        reps = -(-cfg.train.batch_size // len(train))
        train = ArraySplit(torch.cat([train.images] * reps), torch.cat([train.targets] * reps))
    site = SiteRuntime(cfg, InProcessTransport(coord), SiteData(train, data.val), seed=0)
    site.join()
    times = []
    with _threads(threads):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            site.train_step(0, i, i)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    b = cfg.train.batch_size
    return {"threads": threads, "batch": b, "image_size": cfg.data.image_size, "backbone": backbone,
            "embedding": cfg.model.embedding,
            "head": cfg.model.head, "step_s": s, "step_s_all": times, "images_per_s": b / s,
            "site_parameters": sum(p.numel() for p in site.model.parameters()),
            "backbone_parameters": coord.num_params}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _threads_arg(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and steps (a smoke run)")
    ap.add_argument("--site", default=str(ROOT / "sites" / "chase-db1-vessels.toml"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="default: the site's train.batch_size")
    ap.add_argument("--backbone", default="swin-tiny")
    ap.add_argument("--data-root", default=None)
    default_threads = torch.get_num_threads()
    ap.add_argument("--loader-threads", type=_threads_arg, default=sorted({default_threads, 1}, reverse=True),
                    help="torch intra-op threads for the loader modes, e.g. 2,1 (default: this process's, then 1 "
                         "as in a DataLoader worker)")
    ap.add_argument("--train-threads", type=_threads_arg, default=sorted({default_threads, 1}, reverse=True),
                    help="torch threads for the training step (the first is the headline's)")
    ap.add_argument("--train-batch", type=_threads_arg, default=[16],
                    help="further training batch sizes (besides the site's), at the first train thread count")
    ap.add_argument("--no-train", action="store_true", help="loader modes only (no ratio)")
    args = ap.parse_args(argv)
    tuned = tune_allocator()
    torch.manual_seed(0)
    overrides: dict[str, Any] = {"data": {"image_size": args.size}}
    if args.batch:
        overrides["train"] = {"batch_size": args.batch}
    cfg = load_site(args.site, overrides)
    epochs, repeats, warmup, steps = (4, 1, 1, 2) if args.quick else (20, 3, 1, 4)
    load_before = _loadavg()
    t_start = time.perf_counter()
    loaders: dict[str, Any] = {"threads": {}}
    data = None
    for n in args.loader_threads:
        with _threads(n):
            out, data = bench_loaders(cfg, args.data_root, epochs, repeats)
        loaders["threads"][str(n)] = out.pop("modes")
        loaders.update(out)
    assert data is not None
    train: dict[str, Any] = {}
    if not args.no_train:
        site_batch = cfg.train.batch_size
        cases = [(site_batch, n) for n in args.train_threads]
        cases += [(b, args.train_threads[0]) for b in args.train_batch if b != site_batch]
        for b, n in cases:
            bcfg = load_site(args.site, {**overrides, "train": {"batch_size": b}})
            timed = max(2, steps // 2) if b > site_batch else steps  # keeps a full run under ~3 minutes
            train[f"b{b}@{n}t"] = bench_train(bcfg, data, warmup, timed, args.backbone, n)
    head_loader = str(args.loader_threads[0])
    # the consumption rate to beat: the fastest training case at the headline thread count
    head_train = max((k for k in train if k.endswith(f"@{args.train_threads[0]}t")),
                     key=lambda k: train[k]["images_per_s"], default=None)
    result: dict[str, Any] = {
        "loader_vs_train_consumption_ratio": None,
        "goal": f">= {GOAL:g}",
        "headline": f"plain_augment_per_epoch at {head_loader} loader threads (today's path: augment_batch in "
                    f"train_step) over the fastest training step case ({head_train})",
        "train_images_per_s": train[head_train]["images_per_s"] if head_train else None,
        "site": Path(args.site).name,
        "quick": args.quick,
        "loader": loaders,
        "train": train,
        "ratios": {},
        "allocator_tuned": tuned,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "monai": __import__("monai").__version__,
            "threads": default_threads,
            "cpu_count": os.cpu_count(),
        },
        "load_average": {"before": load_before, "after": _loadavg()},
        "wall_s": time.perf_counter() - t_start,
    }
    if head_train:
        rate = train[head_train]["images_per_s"]
        result["ratios"] = {f"{k}@{n}t": v["images_per_s"] / rate
                            for n, modes in loaders["threads"].items() for k, v in modes.items()}
        result["loader_vs_train_consumption_ratio"] = result["ratios"][f"plain_augment_per_epoch@{head_loader}t"]
        worst = min(result["ratios"], key=result["ratios"].__getitem__)
        result["min_ratio"] = {"mode": worst, "ratio": result["ratios"][worst]}
        # today's runtime augments inside train_step, serially: the step's effective rate
        aug = loaders["threads"][head_loader]["plain_augment_per_epoch"]["images_per_s"]
        result["train_with_inline_augment_images_per_s"] = 1.0 / (1.0 / rate + 1.0 / aug)
    print_fn(f"{'loader mode':<36}{'threads':>8}{'images':>7}{'seconds':>9}{'img/s':>9}{'vs train':>10}")
    for n, modes in loaders["threads"].items():
        for k, v in modes.items():
            r = result["ratios"].get(f"{k}@{n}t")
            print_fn(f"{k:<36}{n:>8}{v['images']:>7}{v['seconds']:>9.3f}{v['images_per_s']:>9.2f}"
                     f"{(f'{r:.1f}x' if r is not None else '-'):>10}")
    for t in train.values():
        label = f"train step (batch {t['batch']}, {t['image_size']} px)"
        print_fn(f"{label:<36}{t['threads']:>8}{t['batch'] * len(t['step_s_all']):>7}{t['step_s']:>9.3f}"
                 f"{t['images_per_s']:>9.2f}")
    if head_train:
        print_fn(f"loader_vs_train_consumption_ratio = {result['loader_vs_train_consumption_ratio']:.1f} "
                 f"(goal >= {GOAL:g}; {result['headline']})")
        print_fn(f"slowest loader mode: {worst} at {result['ratios'][worst]:.1f}x the training consumption")
    m = result["machine"]
    print_fn(f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['threads']} threads), "
             f"MONAI {m['monai']}; load average before {load_before}, after {result['load_average']['after']}; "
             f"wall {result['wall_s']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

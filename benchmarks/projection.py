"""Benchmark: Gram-matrix conflicting-gradient projection vs the per-pair reference loop.

    python benchmarks/projection.py --out FILE.json [--quick]

Times ``project_conflicting`` (one float64 Gram pass + one combination) against
``project_conflicting_reference`` run in float32 on the same flattened float32 gradients,
for K in {2, 4, 8, 16, 32} sites and P in {1M, 10M} parameters (``--quick``: P in
{10k, 100k}). Each time is the median of a few ``time.perf_counter`` repeats; the loop
gets fewer repeats at P = 10M because one run of it takes seconds.

It also times one backward pass of the demo backbone (``build_backbone("swin-tiny")``,
batch 16, z of 32 x 32) and the projection at K = 16 with P = that backbone's parameter
count, and reports projection time / backward time.

The headline ``projection_fraction_of_backward_k16`` is the LATENCY AFTER THE LAST SLOT
ARRIVES over one backward: the coordinator calls ``ProjectionAggregator.prepare`` as each
site's gradient slot is written, so rows 0..K-2 are prepared first (timed separately, off the
critical path: ``prepare_s_per_row``), then the backward pass for the last site runs and
``prepare(K - 1)`` + ``__call__`` right after it are timed (as in the coordinator: the
aggregation starts while torch's threads are still busy from the backward). The
non-incremental aggregator call (no prepare: all K(K+1)/2 order-independent Gram entries)
is ``projection_fraction_of_backward_k16_full``; ``project_conflicting`` (the same Gram in one
pass over the rows) keeps its own keys in ``backbone``. Backward passes and aggregation rounds
alternate (15 of each, medians), so a drift in the machine's speed moves both alike.

Site gradients are i.i.d. standard normal: in high dimension their pairwise cosines are
~0 with random sign, so about half the pairs conflict and the loop does a real update for
about half of them (the counts are recorded per case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from fedbone_med.aggregation import (  # noqa: E402
    ProjectionAggregator,
    native,
    project_conflicting,
    project_conflicting_reference,
)
from fedbone_med.perf import tune_allocator  # noqa: E402

SITES = (2, 4, 8, 16, 32)
SIZES_FULL = (1_000_000, 10_000_000)
SIZES_QUICK = (10_000, 100_000)
BACKBONE_BATCH, BACKBONE_HW, BACKBONE_K = 16, 32, 16  # the demo: 64 px images, stride-2 embedding


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """Median and all wall-clock times (s) of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine_info() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()),  # other processes skew the timings
    }


def bench_case(k: int, p: int, seed: int, fast_repeats: int, loop_repeats: int) -> dict[str, object]:
    """Time fast vs loop on K x P float32 gaussian gradients with one fixed site order."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=gen)  # (K, P) float32
    order = torch.randperm(k, generator=gen).tolist()

    fast_s, fast_all = timed(lambda: project_conflicting(grads, order=order), fast_repeats, warmup=1)
    combined, stats = project_conflicting(grads, order=order)

    loop_out: list[Tensor] = []

    def loop() -> None:
        loop_out[:] = [project_conflicting_reference(grads, order, "mean", None, dtype=torch.float32)]

    loop_s, loop_all = timed(loop, loop_repeats, warmup=1 if p <= 1_000_000 else 0)
    ref = loop_out[0]
    rel_diff = float((combined - ref).norm() / ref.norm().clamp_min(1e-30))
    return {
        "K": k,
        "P": p,
        "fast_s": fast_s,
        "loop_s": loop_s,
        "speedup": loop_s / fast_s,
        "fast_times_s": fast_all,
        "loop_times_s": loop_all,
        "conflicting_pairs": stats.conflicting_pairs,
        "projections_applied": stats.projections_applied,
        "fast_vs_loop_rel_l2_diff": rel_diff,
    }


class StandInBackbone(nn.Module):
    """Used only if ``fedbone_med.models.build_backbone`` cannot be imported.

    A 4-stage pyramid like the Swin backbone's interface: each stage is a stride-2 3x3
    conv doubling the channels, GELU and GroupNorm; returns the 4 feature maps.
    """

    def __init__(self, in_channels: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        chans = [in_channels * 2**i for i in range(5)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU(), nn.GroupNorm(8, c_out))
            for c_in, c_out in zip(chans[:-1], chans[1:], strict=True)
        )

    def forward(self, z: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            z = stage(z)
            feats.append(z)
        return feats


def load_backbone() -> tuple[nn.Module, str]:
    """The demo backbone, or the documented stand-in if the models package is unavailable."""
    try:
        from fedbone_med.models import build_backbone
    except ImportError as exc:
        return StandInBackbone(32), f"stand-in 4-stage conv pyramid (import failed: {exc})"
    return build_backbone("swin-tiny"), "fedbone_med.models.build_backbone('swin-tiny')"


def bench_backbone(seed: int, repeats: int) -> dict[str, object]:
    """Backward time of the backbone vs projection time at K = 16, P = its parameter count."""
    torch.manual_seed(seed)
    backbone, source = load_backbone()
    backbone.train()
    params = [q for q in backbone.parameters() if q.requires_grad]
    num_params = sum(q.numel() for q in params)
    in_channels = backbone.in_channels
    if not isinstance(in_channels, int):
        raise TypeError(f"backbone.in_channels must be an int, got {type(in_channels).__name__}")
    z = torch.randn(BACKBONE_BATCH, in_channels, BACKBONE_HW, BACKBONE_HW)  # (B, C, H, W)

    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(BACKBONE_K, num_params, generator=gen)  # (K, P) float32
    order = torch.randperm(BACKBONE_K, generator=gen).tolist()
    proj_s, proj_all = timed(lambda: project_conflicting(grads, order=order), repeats=5, warmup=1)
    # The memory floor: one read of the (K, P) slots. The projection must read them at least
    # twice (Gram matrix, then the final combination), so it cannot beat ~2x this.
    read_s, _ = timed(lambda: grads.sum(dim=1), repeats=5, warmup=1)

    # The aggregator as the coordinator drives it: rows 0..K-2 are prepared as their slots land
    # (while other sites compute), then the server's backward pass for the last site runs, and
    # prepare(K - 1) + the call follow it at once -- as in Coordinator.backward, where the last
    # site's backward is immediately followed by the aggregation (so the aggregation starts while
    # torch's OpenMP threads are still spinning from the backward). Backward passes and aggregation
    # rounds alternate, so a drift in the machine's speed (a shared 2-core VM) affects numerator and
    # denominator alike.
    agg = ProjectionAggregator(seed=seed)

    def rounds(times: dict[str, list[float]]) -> None:
        for rep in range(repeats + 1):  # the first round is warm-up
            for row in range(BACKBONE_K - 1):
                start = time.perf_counter()
                agg.prepare(grads, row)
                if rep:
                    times["prepare"].append(time.perf_counter() - start)
            backbone.zero_grad(set_to_none=True)
            outputs = backbone(z)
            loss = sum(f.float().pow(2).mean() for f in outputs)
            start = time.perf_counter()
            loss.backward()  # the last site's backward ...
            mid = time.perf_counter()
            agg.prepare(grads, BACKBONE_K - 1)  # ... its slot is in ...
            agg(grads)  # ... and the step's aggregation runs
            end = time.perf_counter()
            if rep:
                times["backward"].append(mid - start)
                times["after_last"].append(end - mid)

    times: dict[str, list[float]] = {"prepare": [], "backward": [], "after_last": []}
    rounds(times)
    backward_times, prepare_times, after_last_times = times["backward"], times["prepare"], times["after_last"]
    backward_s = statistics.median(backward_times)
    after_last_s = statistics.median(after_last_times)
    full_s, full_all = timed(lambda: agg(grads), repeats=3, warmup=1)  # no prepare: every entry
    kernel = native.status()
    # The same latency on the PyTorch Gram path (what runs where no C compiler is available).
    saved = os.environ.get("FEDBONE_NATIVE")
    os.environ["FEDBONE_NATIVE"] = "0"
    native.reset()
    try:
        torch_times: dict[str, list[float]] = {"prepare": [], "backward": [], "after_last": []}
        rounds(torch_times)
        torch_path_times = torch_times["after_last"]
    finally:
        if saved is None:
            del os.environ["FEDBONE_NATIVE"]
        else:
            os.environ["FEDBONE_NATIVE"] = saved
        native.reset()
    torch_path_s = statistics.median(torch_path_times)
    slot_bytes = grads.numel() * grads.element_size()
    return {
        "backbone": source,
        "num_params": num_params,
        "batch": BACKBONE_BATCH,
        "input_hw": BACKBONE_HW,
        "in_channels": in_channels,
        "backward_s": backward_s,
        "backward_times_s": backward_times,
        "K": BACKBONE_K,
        "projection_s": proj_s,
        "projection_times_s": proj_all,
        "projection_fraction_of_backward": proj_s / backward_s,
        "projection_fraction_of_step_backward": proj_s / (BACKBONE_K * backward_s),
        "read_slots_once_s": read_s,
        "projection_over_read_once": proj_s / read_s,
        "prepare_s_per_row": statistics.median(prepare_times),
        "prepare_times_s": prepare_times,
        "after_last_arrival_s": after_last_s,
        "after_last_arrival_times_s": after_last_times,
        "after_last_fraction_of_backward": after_last_s / backward_s,
        "after_last_over_read_once": after_last_s / read_s,
        "aggregator_full_s": full_s,
        "aggregator_full_times_s": full_all,
        "aggregator_full_fraction_of_backward": full_s / backward_s,
        "gram_kernel": kernel,
        "after_last_arrival_s_torch_path": torch_path_s,
        # what the goal asks of the host: the latency after the last arrival reads the slots at least
        # twice, so at 0.10 of a backward the slots must be read at this rate (or faster)
        "slot_read_gbps": slot_bytes / read_s / 1e9,
        "slot_read_gbps_needed_for_goal_at_two_reads": 2 * slot_bytes / (0.10 * backward_s) / 1e9,
        "after_last_fraction_of_backward_torch_path": torch_path_s / backward_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="small P for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tuned = tune_allocator()

    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    machine_start = machine_info()
    cases = []
    print(f"{'K':>4} {'P':>11} {'fast s':>10} {'loop s':>10} {'speedup':>9}", flush=True)
    for p in sizes:
        for k in SITES:
            big = p >= 10_000_000
            case = bench_case(k, p, args.seed, fast_repeats=3 if big else 5, loop_repeats=2 if big else 3)
            cases.append(case)
            row = f"{k:>4} {p:>11,} {case['fast_s']:>10.4f} {case['loop_s']:>10.4f} {case['speedup']:>8.1f}x"
            print(row, flush=True)

    backbone = bench_backbone(args.seed, repeats=15)
    print(
        f"backbone: {backbone['backbone']}, P = {backbone['num_params']:,}: backward "
        f"{backbone['backward_s']:.4f} s, projection K={BACKBONE_K} {backbone['projection_s']:.4f} s "
        f"-> fraction {backbone['projection_fraction_of_backward']:.3f} of one backward, "
        f"{backbone['projection_fraction_of_step_backward']:.3f} of the step's {BACKBONE_K} backwards; "
        f"reading the slots once takes {backbone['read_slots_once_s']:.4f} s"
    )
    print(
        f"incremental (ProjectionAggregator.prepare per arriving slot): prepare "
        f"{backbone['prepare_s_per_row']:.4f} s per row off the critical path; after the last "
        f"arrival prepare+call {backbone['after_last_arrival_s']:.4f} s -> fraction "
        f"{backbone['after_last_fraction_of_backward']:.3f} of one backward "
        f"({backbone['after_last_over_read_once']:.1f}x one read of the slots); "
        f"full call without prepare {backbone['aggregator_full_s']:.4f} s -> fraction "
        f"{backbone['aggregator_full_fraction_of_backward']:.3f}; Gram kernel: {backbone['gram_kernel']}; "
        f"after the last arrival on the PyTorch Gram path {backbone['after_last_arrival_s_torch_path']:.4f} s "
        f"-> fraction {backbone['after_last_fraction_of_backward_torch_path']:.3f}"
    )
    print(
        f"memory: the slots are read at {backbone['slot_read_gbps']:.1f} GB/s here; the goal (<= 0.10 of a "
        f"backward) needs at least {backbone['slot_read_gbps_needed_for_goal_at_two_reads']:.1f} GB/s even at the "
        "two-read floor"
    )

    k16_p10m = [c for c in cases if c["K"] == 16 and c["P"] == 10_000_000]
    result = {
        "speedup_vs_loop_k16_p10m": k16_p10m[0]["speedup"] if k16_p10m else None,
        "projection_fraction_of_backward_k16": backbone["after_last_fraction_of_backward"],
        "projection_fraction_of_backward_k16_full": backbone["aggregator_full_fraction_of_backward"],
        "projection_fraction_of_backward_k16_torch_path": backbone["after_last_fraction_of_backward_torch_path"],
        # the same latency in units of one read of the (K, P) slot matrix: what the memory-bound part costs
        # whatever the host's memory bandwidth at the time (the floor is 2: the last Gram row, the combination)
        "projection_after_last_in_slot_reads_k16": backbone["after_last_over_read_once"],
        # the goal <= 0.10 is reachable on this host only if slot_read_gbps is at least
        # slot_read_gbps_needed_for_goal_at_two_reads (the two-read floor, no overhead at all)
        "slot_read_gbps": backbone["slot_read_gbps"],
        "slot_read_gbps_needed_for_goal_at_two_reads": backbone["slot_read_gbps_needed_for_goal_at_two_reads"],
        "gram_kernel": backbone["gram_kernel"],
        "projection_fraction_of_step_backward_k16": backbone["projection_fraction_of_step_backward"],
        "allocator_tuned": tuned,
        "quick": args.quick,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_start,
        "load_average_at_end": list(os.getloadavg()),
        "method": {
            "fast": "project_conflicting: the order-independent Gram (gram_entries, all K(K+1)/2 entries in "
            "one pass over the rows through the compiled kernel when available), then the (K,) @ (K, P) "
            "combination (one read of the rows)",
            "incremental": "projection_fraction_of_backward_k16 = latency AFTER THE LAST SLOT ARRIVES "
            "(ProjectionAggregator.prepare(K-1) + __call__ timed right after the last site's backward "
            "pass, as the coordinator runs them; rows 0..K-2 prepared beforehand and timed "
            "separately as prepare_s_per_row) over one backbone backward; Gram entries by "
            "gram_entries (exact float64 products, fixed lane order), bit-identical for any arrival order; "
            "float32 slots through the compiled kernel of fedbone_med.aggregation.native when it is available "
            "(gram_kernel says whether it was); *_torch_path: the same with FEDBONE_NATIVE=0",
            "full": "projection_fraction_of_backward_k16_full = ProjectionAggregator.__call__ without "
            "prepare (all K(K+1)/2 order-independent Gram entries) over one backward",
            "loop": "project_conflicting_reference(dtype=float32): per-pair dot/axpy loop",
            "grads": "float32 i.i.d. standard normal, one fixed random site order per case",
            "timing": "time.perf_counter, median of repeats (fast: 5, 3 at P=10M; loop: 3, 2 at P=10M; "
            "incremental and backward: 15 rounds after 1 warm-up round; full aggregator call: 3)",
        },
        "cases": cases,
        "backbone": backbone,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the Gram-matrix aggregation (GPAggregation) against the literal loop and against the server's compute.

    python benchmarks/aggregation.py --out FILE.json [--quick] [--repeats N] [--step-passes N]

Headline keys (top level of the JSON):

``gpagg_speedup_vs_loop_k16_p10m`` (goal >= 20): ``gpaggregate`` (one blocked float64 GEMM for
the 17 x 17 Gram matrix of 16 site gradients and the previous aggregate, the K x K coefficient
loop, one GEMV) against ``gpaggregation_reference`` (Algorithm 2 transcribed as a per-pair loop
of dot products and axpys on flattened float64 copies), K = 16, P = 10M float32 gradients with
a previous aggregate. Other K and P are in ``cases`` (``--quick``: P in {10k, 100k}).

``aggregation_fraction_of_step_k16`` (goal <= 0.05): one call of ``GPAggregator`` (P = the
parameter count of the demo backbone, ``pipelines/demo.toml``'s ``[server.backbone]``; K = 16;
a previous aggregate present) over the server's compute of one step at K = 16: 16 forward and
backward passes of that backbone at the demo's batch and z shape (the first site's batch size,
its z of ``image_size / stride`` square, the backbone's input channels). Steps and aggregations
alternate (``--repeats`` each, medians), so a drift in the machine's speed moves both alike.
``--step-passes n`` times n passes per step measurement and scales to 16 (default 16: none).

``round_cadence_aggregation_fraction_of_round`` (goal <= 0.01): the round cadence aggregates
the K = 16 replica updates (a (K, P) matrix, the same call) once per round; a round's server
compute is ``steps_per_round`` (the demo's) x K site steps of one forward and backward each
(the replicas' optimizer steps are not counted: the denominator is a lower bound). The demo's
own K (its number of sites) is reported beside it.

Gradients are i.i.d. standard normal float32 (about half the pairs conflict in high dimension).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from fedbone_med.aggregation import GPAggregator, gpaggregate, gpaggregation_reference, gram_matrix  # noqa: E402
from fedbone_med.config import BackboneConfig, load_experiment, z_side  # noqa: E402
from fedbone_med.models import build_backbone  # noqa: E402
from fedbone_med.perf import machine_info, tune_allocator  # noqa: E402

DEMO = REPO / "pipelines" / "demo.toml"
K_STEP = 16
CASES_FULL = ((4, 1_000_000), (16, 1_000_000), (4, 10_000_000), (16, 10_000_000))
CASES_QUICK = ((4, 10_000), (16, 10_000), (4, 100_000), (16, 100_000))


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


def bench_case(k: int, p: int, seed: int, loop_repeats: int) -> dict[str, object]:
    """The Gram path vs the literal loop on K x P float32 gradients with a previous aggregate."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, p, generator=gen)  # (K, P) float32
    previous = grads.mean(0) + torch.randn(p, generator=gen)  # (P,)
    order = list(range(k))
    fast_s, fast_all = timed(lambda: gpaggregate(grads, previous, order=order), 5, warmup=1)
    out, stats = gpaggregate(grads, previous, order=order)
    ref: list[torch.Tensor] = []
    loop_s, loop_all = timed(lambda: ref.append(gpaggregation_reference(grads, previous, order)), loop_repeats)
    rel = float((out.double() - ref[-1]).norm() / ref[-1].norm().clamp_min(1e-300))
    return {"K": k, "P": p, "gram_path_s": fast_s, "loop_s": loop_s, "speedup": loop_s / fast_s,
            "gram_path_times_s": fast_all, "loop_times_s": loop_all,
            "conflicting_pairs": stats.conflicting_pairs, "projections_applied": stats.projections_applied,
            "gram_path_vs_loop_rel_l2_diff": rel}


@dataclass(frozen=True)
class DemoShape:
    """What the step and round measurements take from ``pipelines/demo.toml``."""

    backbone: BackboneConfig
    batch: int  # the first site's batch size
    z_side: int  # its z at the cut: image_size / stride, square
    steps_per_round: int
    num_sites: int

    @classmethod
    def load(cls) -> DemoShape:
        exp = load_experiment(DEMO)
        site = exp.sites[0]
        return cls(exp.server.backbone, site.train.batch_size, z_side(site.data.image_size, site.model.stride),
                   exp.steps_per_round, len(exp.sites))


def bench_step(seed: int, repeats: int, step_passes: int) -> dict[str, object]:
    """GPAggregator at K = 16 (and the demo's K) vs one step's forward and backward passes."""
    torch.manual_seed(seed)
    demo = DemoShape.load()
    backbone = build_backbone(demo.backbone)
    backbone.train()
    num_params = sum(q.numel() for q in backbone.parameters())
    side, batch = demo.z_side, demo.batch
    z = torch.randn(batch, backbone.in_channels, side, side)  # (B, C, H, W)

    def passes() -> None:
        for _ in range(step_passes):
            backbone.zero_grad(set_to_none=True)
            loss = torch.stack([f.float().pow(2).mean() for f in backbone(z)]).sum()
            loss.backward()

    gen = torch.Generator().manual_seed(seed)
    aggs = {}
    for k in sorted({K_STEP, demo.num_sites}):
        grads = torch.randn(k, num_params, generator=gen)  # (K, P) float32
        agg = GPAggregator(num_params=num_params)
        agg(grads)  # the first call (no g' yet); the timed calls have a previous aggregate
        aggs[k] = (agg, grads)
    passes()  # warm-up
    times: dict[str, list[float]] = {"step": [], **{f"agg_k{k}": [] for k in aggs}}
    for _ in range(repeats):
        start = time.perf_counter()
        passes()
        times["step"].append((time.perf_counter() - start) * K_STEP / step_passes)
        for k, (agg, grads) in aggs.items():
            start = time.perf_counter()
            agg(grads)
            times[f"agg_k{k}"].append(time.perf_counter() - start)
    agg16, grads16 = aggs[K_STEP]
    prev = agg16.previous
    gram_s, _ = timed(lambda: gram_matrix(grads16, prev), 3)
    read_s, _ = timed(lambda: grads16.sum(dim=1), 3, warmup=1)
    step_s = statistics.median(times["step"])
    fwd_bwd_s = step_s / K_STEP
    round_passes = demo.steps_per_round
    out: dict[str, object] = {
        "backbone": f"build_backbone({demo.backbone!r}) from {DEMO.relative_to(REPO)}",
        "num_params": num_params, "batch": batch, "z": [backbone.in_channels, side, side],
        "step_passes_timed": step_passes, "step_k16_s": step_s, "step_k16_times_s": times["step"],
        "forward_backward_s": fwd_bwd_s, "gram_k16_s": gram_s, "read_slots_once_k16_s": read_s,
        "steps_per_round": round_passes, "demo_num_sites": demo.num_sites,
    }
    for k in aggs:
        agg_s = statistics.median(times[f"agg_k{k}"])
        out[f"aggregation_k{k}_s"] = agg_s
        out[f"aggregation_k{k}_times_s"] = times[f"agg_k{k}"]
        out[f"aggregation_fraction_of_step_k{k}"] = agg_s / (k * fwd_bwd_s)
        out[f"round_cadence_aggregation_fraction_of_round_k{k}"] = agg_s / (round_passes * k * fwd_bwd_s)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="small P for the loop cases, 2 passes per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="step / aggregation measurements (medians)")
    parser.add_argument("--step-passes", type=int, default=None,
                        help=f"forward+backward passes timed per step, scaled to {K_STEP} (default {K_STEP}; quick 2)")
    args = parser.parse_args(argv)
    tuned = tune_allocator()
    step_passes = args.step_passes or (2 if args.quick else K_STEP)
    machine = {**machine_info(), "load_average_1_5_15min": list(os.getloadavg())}

    print(f"{'K':>4} {'P':>11} {'gram s':>10} {'loop s':>10} {'speedup':>9}", flush=True)
    cases = []
    for k, p in CASES_QUICK if args.quick else CASES_FULL:
        case = bench_case(k, p, args.seed, loop_repeats=2 if p >= 10_000_000 else 3)
        cases.append(case)
        print(f"{k:>4} {p:>11,} {case['gram_path_s']:>10.4f} {case['loop_s']:>10.4f} {case['speedup']:>8.1f}x",
              flush=True)

    step = bench_step(args.seed, args.repeats, step_passes)
    k_demo = step["demo_num_sites"]
    print(f"demo backbone P = {step['num_params']:,}, batch {step['batch']}, z {step['z']}: one step at "
          f"K = {K_STEP} ({K_STEP} forward+backward) {step['step_k16_s']:.3f} s; GPAggregator K = {K_STEP} "
          f"{step['aggregation_k16_s']:.4f} s (Gram {step['gram_k16_s']:.4f} s, one read of the slots "
          f"{step['read_slots_once_k16_s']:.4f} s) -> {step['aggregation_fraction_of_step_k16']:.4f} of the step")
    print(f"round cadence: {step['steps_per_round']} steps x K site passes per round -> "
          f"{step['round_cadence_aggregation_fraction_of_round_k16']:.5f} of the round at K = {K_STEP}, "
          f"{step[f'round_cadence_aggregation_fraction_of_round_k{k_demo}']:.5f} at the demo's K = {k_demo}")

    k16_p10m = [c for c in cases if c["K"] == 16 and c["P"] == 10_000_000]
    result = {
        "gpagg_speedup_vs_loop_k16_p10m": k16_p10m[0]["speedup"] if k16_p10m else None,
        "aggregation_fraction_of_step_k16": step["aggregation_fraction_of_step_k16"],
        "round_cadence_aggregation_fraction_of_round": step["round_cadence_aggregation_fraction_of_round_k16"],
        "goals": {"gpagg_speedup_vs_loop_k16_p10m": ">= 20", "aggregation_fraction_of_step_k16": "<= 0.05",
                  "round_cadence_aggregation_fraction_of_round": "<= 0.01"},
        "allocator_tuned": tuned,
        "quick": args.quick,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "method": {
            "gram_path": "gpaggregate / GPAggregator: the (K+1) x (K+1) Gram of [g_1..g_K, g'] by one blocked GEMM "
            "(1 MiB float64 column blocks, upcast from float32, addmm_ accumulated in float64), Algorithm 2's "
            "coefficients from it (NumPy, K x K), then w @ grads (one GEMV)",
            "loop": "gpaggregation_reference: Algorithm 2 as a per-pair loop of dot products and axpys on float64 "
            "copies of the flattened gradients",
            "step": f"{K_STEP} forward + backward passes of the demo backbone (loss: sum of mean squares of its "
            "features), timed alternately with the aggregation calls; medians",
            "round": "steps_per_round x K forward + backward passes (from the step's per-pass time); the round "
            "cadence's aggregation is the same call on the (K, P) replica updates",
        },
        "cases": cases,
        "step": step,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Privacy-utility curve on real data: the CHASE_DB1 vessel site and the RetinaMNIST grading
site trained in one federation at several privacy budgets.

    python benchmarks/privacy.py --out FILE.json [--quick] [--epsilons inf,8,4,1]

For each epsilon both sites turn on activation DP on z and label DP on dF (sigma calibrated
so that the planned run spends at most epsilon; clipping norms from --clip), and the same
federation (swin-tiny backbone, projection) is trained from the same seed; epsilon = inf is
the run without privacy. Writes the sites' final validation metrics per epsilon (key
``metric_by_epsilon``), the epsilon actually spent, and a plot beside the JSON. Reads the
data from $FEDBONE_DATA_ROOT (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedbone_med.config import ExperimentConfig, PrivacyConfig, ServerConfig, load_site
from fedbone_med.experiments.federation import Federation
from fedbone_med.perf import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
SITES = ("chase-db1-vessels.toml", "retinamnist-dr.toml")


def _label(epsilon: float) -> str:
    return "inf" if not math.isfinite(epsilon) else f"{epsilon:g}"


def run_at(epsilon: float, rounds: int, steps: int, clip: float, quick: bool) -> dict:
    sites = []
    for name in SITES:
        cfg = load_site(ROOT / "sites" / name)
        if quick:
            cfg = replace(cfg, data=replace(cfg.data, image_size=64))
        if math.isfinite(epsilon):
            # The validation records are other patients, with their own accountant; here their
            # budget is left open so that every round can be scored (what they spent is reported).
            cfg = replace(cfg, privacy=PrivacyConfig(enabled=True, target_epsilon=epsilon, activation_clip=clip,
                                                     label_clip=clip, validation_epsilon_budget=1e9))
        sites.append(cfg)
    exp = ExperimentConfig(name=f"privacy-eps-{epsilon}", server=ServerConfig(), sites=tuple(sites), seed=0,
                           rounds=rounds, steps_per_round=steps, embedding_fedavg=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = Federation(exp, out).run(progress=False)
    final = results["final"]
    return {
        "epsilon_target": epsilon,
        "seconds": time.perf_counter() - t0,
        "sites": {
            name: {
                "metric": info["primary_metric"],
                "value": final.get(name, {}).get(info["primary_metric"]),
                "chance": final.get(name, {}).get("chance"),
                "epsilon_spent": final.get(name, {}).get("epsilon"),
                "epsilon_validation_spent": final.get(name, {}).get("epsilon_validation"),
                "noise_multiplier": final.get(name, {}).get("noise_multiplier"),
                "stopped": results["stopped"].get(name),
            }
            for name, info in results["sites"].items()
        },
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [_label(r["epsilon_target"]) for r in runs]
    for site in runs[0]["sites"]:
        values = [r["sites"][site]["value"] for r in runs]
        metric = runs[0]["sites"][site]["metric"]
        ax.plot(labels, values, marker="o", label=f"{site} ({metric})")
        chance = runs[0]["sites"][site]["chance"]
        if chance is not None:
            ax.axhline(chance, linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("privacy budget epsilon (delta = 1/(10N))")
    ax.set_ylabel("validation metric")
    ax.legend(fontsize=7)
    ax.set_title("privacy-utility, real data (dotted: chance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="64 px, 2 rounds x 5 steps (a smoke run)")
    ap.add_argument("--epsilons", default="inf,8,4,1")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--clip", type=float, default=1.0, help="clipping norm C for z and dF")
    args = ap.parse_args()
    tune_allocator()
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.steps)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    runs = [run_at(e, rounds, steps, args.clip, args.quick) for e in epsilons]
    metric_by_epsilon = {
        site: {_label(r["epsilon_target"]): r["sites"][site]["value"] for r in runs}
        for site in runs[0]["sites"]
    }
    result = {
        "metric_by_epsilon": metric_by_epsilon,
        "runs": runs,
        "settings": {"rounds": rounds, "steps_per_round": steps, "clip": args.clip, "quick": args.quick,
                     "mechanisms": "activation DP on z + label DP on dF (sigma calibrated per epsilon)"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(f"{'epsilon':>8}  " + "  ".join(f"{s:>22}" for s in runs[0]["sites"]))
    for r in runs:
        e = _label(r["epsilon_target"])
        cells = []
        for s in r["sites"].values():
            v = s["value"]
            spent = s["epsilon_spent"]
            text = "nan" if v is None or v != v else f"{s['metric']} {v:.3f}"
            cells.append(text + (f" (eps {spent:.2f})" if spent is not None else ""))
        print(f"{e:>8}  " + "  ".join(f"{c:>22}" for c in cells))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

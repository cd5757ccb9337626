"""Summaries, tables, CSV, plots and the written report of a reproduction.

Everything here is computed from the runs' numbers: the report's statements (where FedBone
wins and loses, the issue's goals, costs) are generated from the summary, never written in
advance.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from ..checkpoint import write_json_atomic
from ..config import ExperimentConfig, SiteConfig
from ..site.metrics import primary_metric

LABELS = {
    "local": "local-only",
    "fedavg": "FedAvg",
    "fedbone-mean": "FedBone (mean)",
    "fedbone-projection": "FedBone (projection)",
    "central": "centralised",
    "fedbone-projection-avgemb": "FedBone (projection, averaged embeddings)",
    "fedbone-gpagg-step": "FedBone (GPAggregation, step cadence)",
    "fedbone-gpagg-round": "FedBone (GPAggregation, round cadence: the paper's Figure 2)",
}
FEDBONE = "fedbone-projection"
ABLATION = "fedbone-projection-avgemb"
# The report also checks the goals on each run's mean over its last rounds (validation noise).
LAST_ROUNDS = 2
CSV_FIELDS = ["method", "site", "metric", "primary", "mean", "std", "n_seeds", "values"]


def site_metrics(s: SiteConfig) -> list[str]:
    """The metrics reported for a site's task (primary first)."""
    t = s.task
    if t.type == "segmentation":
        return ["dice", "iou"]
    if t.num_classes == 2:
        return ["auc", "accuracy"]
    keys = ["accuracy", "auc", "kappa"]
    first = primary_metric(t)
    return [first] + [k for k in keys if k != first]


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], float("nan")
    return statistics.fmean(vals), statistics.stdev(vals)


def _runs_of(runs: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["method"] == method]


def summarise(cfg: ExperimentConfig, runs: list[dict[str, Any]], costs: dict[str, dict[str, Any]],
              meta: dict[str, Any]) -> dict[str, Any]:
    methods = [m for m in LABELS if any(r["method"] == m for r in runs)]
    first = runs[0]["results"]
    sites: dict[str, Any] = {}
    for s in cfg.sites:
        info = first["sites"][s.name]
        sites[s.name] = {
            "modality": s.modality,
            "task": info["task"],
            "task_type": s.task.type,
            "num_classes": s.task.num_classes,
            "primary_metric": primary_metric(s.task),
            "metrics": site_metrics(s),
            "n_train": info["n_train"],
            "n_val": info["n_val"],
            "split": info["split"],
            "chance": first["final"].get(s.name, {}).get("chance", float("nan")),
        }
    metrics: dict[str, Any] = {}
    last_rounds: dict[str, Any] = {}  # primary metric, each run's mean over its last LAST_ROUNDS rounds
    curves: dict[str, Any] = {}
    traffic: dict[str, Any] = {}
    for m in methods:
        mruns = _runs_of(runs, m)
        metrics[m], curves[m], traffic[m], last_rounds[m] = {}, {}, {}, {}
        for name, info in sites.items():
            metrics[m][name] = {}
            for key in info["metrics"]:
                values = [float(r["results"]["final"].get(name, {}).get(key, float("nan"))) for r in mruns]
                mu, sd = mean_std(values)
                metrics[m][name][key] = {"mean": mu, "std": sd, "values": values}
            tails = []
            for r in mruns:
                by_round = {rec["round"]: float(rec["sites"].get(name, {}).get("primary", float("nan")))
                            for rec in r["results"]["rounds"]}
                tail = [by_round[k] for k in sorted(by_round)[-LAST_ROUNDS:]]
                tails.append(statistics.fmean(tail) if tail else float("nan"))
            mu, sd = mean_std(tails)
            last_rounds[m][name] = {info["primary_metric"]: {"mean": mu, "std": sd, "values": tails}}
            per_round: dict[int, list[float]] = {}
            sent, received = [], []
            for r in mruns:
                for record in r["results"]["rounds"]:
                    site = record["sites"].get(name, {})
                    per_round.setdefault(record["round"], []).append(float(site.get("primary", float("nan"))))
                    if "bytes_sent" in site:
                        sent.append(site["bytes_sent"])
                        received.append(site["bytes_received"])
            rounds = sorted(per_round)
            stats = [mean_std(per_round[k]) for k in rounds]
            curves[m][name] = {"rounds": rounds, "mean": [a for a, _ in stats], "std": [b for _, b in stats]}
            traffic[m][name] = {
                "bytes_sent_per_round": statistics.fmean(sent) if sent else 0.0,
                "bytes_received_per_round": statistics.fmean(received) if received else 0.0,
            }
    aggregation: dict[str, Any] = {}
    for m in methods:
        if not m.startswith("fedbone-"):
            continue
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in _runs_of(runs, m):
            for a in r["results"].get("aggregation", []):
                by_step.setdefault(int(a["step"]), []).append(a)
        steps = sorted(by_step)

        def avg(key: str, steps: list[int] = steps, by_step: dict = by_step) -> list[float]:
            return [statistics.fmean([float(a[key]) if a[key] is not None else float("nan") for a in by_step[s]])
                    for s in steps]

        aggregation[m] = {"step": steps, "conflicting_pairs": avg("conflicting_pairs"),
                          "mean_cosine": avg("mean_cosine"), "min_cosine": avg("min_cosine"),
                          "projections_applied": avg("projections_applied"),
                          "num_pairs": [math.comb(int(by_step[s][0]["num_sites"]), 2) for s in steps]}
    summary = {
        "meta": meta,
        "methods": methods,
        "labels": {m: LABELS[m] for m in methods},
        "sites": sites,
        "metrics": metrics,
        "metrics_last_rounds": last_rounds,
        "curves": curves,
        "traffic": traffic,
        "costs": costs,
        "aggregation": aggregation,
        "runs": runs,
    }
    summary["comparison"] = compare(summary)
    summary["comparison_last_rounds"] = compare(summary, source="metrics_last_rounds")
    if ABLATION in methods:
        summary["comparison_ablation"] = compare(summary, ABLATION)
    return summary


def compare(summary: dict[str, Any], reference: str = FEDBONE, source: str = "metrics") -> dict[str, Any]:
    """``reference`` (FedBone with projection) against every other method on each site's primary metric.

    ``source``: "metrics" (after the last round) or "metrics_last_rounds" (each run's mean over its
    last LAST_ROUNDS rounds, a check against the noise of one round's validation).
    """
    methods = summary["methods"]
    out: dict[str, Any] = {"reference": reference, "sites": {}, "goals": {}}
    if reference not in methods:
        return out
    table = summary[source]
    for name, info in summary["sites"].items():
        key = info["primary_metric"]
        ours = table[reference][name][key]
        rows = {}
        for m in methods:
            if m == reference:
                continue
            other = table[m][name][key]
            diff = ours["mean"] - other["mean"]
            noise = math.hypot(ours["std"], other["std"]) if ours["std"] == ours["std"] else float("nan")
            verdict = "win" if diff > 0 else "loss" if diff < 0 else "tie"
            rows[m] = {"diff": diff, "noise": noise, "verdict": verdict,
                       "beyond_noise": bool(noise == noise and abs(diff) > noise)}
        out["sites"][name] = {"metric": key, "fedbone": ours["mean"], "against": rows}
    goals = out["goals"]
    names = list(summary["sites"])

    def diffs(m: str) -> list[float]:
        return [out["sites"][n]["against"][m]["diff"] for n in names]

    if "local" in methods:
        d = diffs("local")
        goals["projection_at_least_local_on_every_site"] = {
            "met": all(x >= 0 for x in d), "failing_sites": [n for n, x in zip(names, d, strict=True) if x < 0]}
    if "fedavg" in methods:
        d = diffs("fedavg")
        wins = sum(1 for x in d if x > 0)
        goals["projection_beats_fedavg_on_most_sites"] = {"met": wins > len(d) / 2, "wins": wins, "sites": len(d)}
    if "fedbone-mean" in methods:
        d = diffs("fedbone-mean")
        goals["projection_at_least_mean_on_average"] = {"met": statistics.fmean(d) >= 0,
                                                        "mean_diff": statistics.fmean(d)}
    return out


# -- formatting -----------------------------------------------------------------------------


def fmt(mu: float, sd: float) -> str:
    if mu != mu:
        return "n/a"
    return f"{mu:.3f}" if sd != sd else f"{mu:.3f} ± {sd:.3f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metric_table(summary: dict[str, Any]) -> str:
    methods = summary["methods"]
    header = ["site", "task", "metric", "chance"] + [LABELS[m] for m in methods]
    rows = []
    for name, info in summary["sites"].items():
        for key in info["metrics"]:
            cells = [summary["metrics"][m][name][key] for m in methods]
            federated = [c["mean"] for m, c in zip(methods, cells, strict=True) if m != "central"]
            best = max((v for v in federated if v == v), default=float("nan"))
            if len({v for v in federated if v == v}) <= 1:
                best = float("nan")  # all equal: no best
            row = [name, info["task"], key + (" (primary)" if key == info["primary_metric"] else ""),
                   f"{info['chance']:.3f}" if key == info["primary_metric"] else ""]
            for m, c in zip(methods, cells, strict=True):
                text = fmt(c["mean"], c["std"])
                row.append(f"**{text}**" if m != "central" and c["mean"] == best else text)
            rows.append(row)
    return _md_table(header, rows)


def cost_table(summary: dict[str, Any]) -> str:
    fb = FEDBONE if FEDBONE in summary["traffic"] else "fedbone-mean"
    header = ["site", "parameters at site / full model", "MACs per image at site / full",
              "peak step memory at site (FedBone) / full model", "bytes per round FedBone sent / received",
              "bytes per round FedAvg sent / received"]
    rows = []
    for name, c in summary["costs"].items():
        mem = "not measured"
        if "site_step_peak_bytes" in c:
            mem = (f"{human_bytes(c['site_step_peak_bytes'])} / {human_bytes(c['full_step_peak_bytes'])}"
                   f" ({c['site_step_peak_bytes'] / c['full_step_peak_bytes']:.0%})")

        def traffic(m: str, name: str = name) -> str:
            t = summary["traffic"].get(m, {}).get(name)
            if not t:
                return "-"
            return f"{human_bytes(t['bytes_sent_per_round'])} / {human_bytes(t['bytes_received_per_round'])}"

        rows.append([
            name,
            f"{c['site_parameters']:,} / {c['full_parameters']:,} ({c['site_param_fraction']:.1%})",
            f"{c['site_macs'] / 1e6:.1f} M / {c['full_macs'] / 1e6:.1f} M ({c['site_mac_fraction']:.0%})",
            mem, traffic(fb), traffic("fedavg"),
        ])
    return _md_table(header, rows)


def _header(summary: dict[str, Any]) -> list[str]:
    meta = summary["meta"]
    mach = meta["machine"]
    cfg = meta["config"]
    n = len(meta["seeds"])
    return [
        f"Experiment `{meta['experiment']}` (profile `{meta['profile']}`), {len(summary['sites'])} sites, "
        f"{meta['rounds']} rounds x {meta['steps_per_round']} steps = {meta['steps_per_site']} training steps per "
        f"site for every method, backbone `{cfg['server']['backbone']['name']}`, {n} seed(s) "
        f"{meta['seeds']}, FedBone transport `{meta['transport']}`.",
        f"Run {meta['started']} on {mach['platform']} ({mach['cpu_cores']} cores, {mach['torch_threads']} torch "
        f"threads, torch {mach['torch']}), fedbone-med {meta['software_version']}; training took "
        f"{meta['seconds'] / 60:.1f} min.",
    ]


def table_markdown(summary: dict[str, Any]) -> str:
    n = len(summary["meta"]["seeds"])
    spread = "mean ± std over seeds" if n > 1 else "one seed"
    return "\n".join([
        f"# {summary['meta']['experiment']}: FedBone and its baselines",
        "",
        *_header(summary),
        "",
        f"## Validation metrics after the last round ({spread}; best non-centralised method in bold)",
        "",
        metric_table(summary),
        "",
        "## Cost at each site",
        "",
        cost_table(summary),
        "",
    ])


def _goal_lines(g: dict[str, Any], who: str) -> list[str]:
    lines = []
    if "projection_at_least_local_on_every_site" in g:
        x = g["projection_at_least_local_on_every_site"]
        lines.append(f"- {who} at least as good as local-only on every site: "
                     f"{'met' if x['met'] else 'not met (' + ', '.join(x['failing_sites']) + ')'}.")
    if "projection_beats_fedavg_on_most_sites" in g:
        x = g["projection_beats_fedavg_on_most_sites"]
        lines.append(f"- {who} better than FedAvg on most sites: {'met' if x['met'] else 'not met'} "
                     f"({x['wins']} of {x['sites']}).")
    if "projection_at_least_mean_on_average" in g:
        x = g["projection_at_least_mean_on_average"]
        lines.append(f"- {who} at least as good as FedBone (mean) on average: "
                     f"{'met' if x['met'] else 'not met'} "
                     f"(mean difference of the primary metrics {x['mean_diff']:+.3f}).")
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    comp = summary["comparison"]
    lines = [f"# Report: {summary['meta']['experiment']}", "", *_header(summary), ""]
    if not comp["sites"]:
        lines.append("FedBone (projection) was not among the methods run; nothing to compare.")
        return "\n".join(lines) + "\n"
    n = len(summary["meta"]["seeds"])
    lines += ["## Where FedBone (projection) wins and loses", "",
              "Primary metric of each site, FedBone (projection) minus the other method"
              + (" (\"clear\": the difference exceeds the seeds' combined standard deviation)." if n > 1
                 else "; one seed, so no difference can be told from seed noise.")]
    lines.append("")
    for name, row in comp["sites"].items():
        wins = [m for m, r in row["against"].items() if r["verdict"] == "win"]
        losses = [m for m, r in row["against"].items() if r["verdict"] == "loss"]

        def part(ms: list[str], row: dict = row) -> str:
            against = row["against"]
            return ", ".join(
                f"{LABELS[m]} ({against[m]['diff']:+.3f}{', clear' if against[m]['beyond_noise'] else ''})"
                for m in ms) or "none"

        lines.append(f"- **{name}** ({row['metric']} {row['fedbone']:.3f}): wins against {part(wins)}; "
                     f"loses against {part(losses)}.")
    lines += ["", "## The issue's goals", "", *_goal_lines(comp["goals"], LABELS[FEDBONE])]
    tail = summary.get("comparison_last_rounds")
    if tail and tail["goals"]:
        lines += ["", f"The same goals on each run's mean over its last {LAST_ROUNDS} rounds instead of the last round "
                  "(a check against the noise of a single round's validation; the tables report the last round):",
                  "", *_goal_lines(tail["goals"], LABELS[FEDBONE])]
    if "comparison_ablation" in summary:
        abl = summary["comparison_ablation"]
        lines += ["", f"## Ablation: {LABELS[ABLATION]}", "",
                  "The same FedBone (projection) runs with the embeddings of same-modality sites averaged (FedAvg, "
                  "weighted by training samples) at every round's end; "
                  "primary metric, ablation minus FedBone (projection): "
                  + ", ".join(f"{n} {r['against'][FEDBONE]['diff']:+.3f}" for n, r in abl["sites"].items()) + ".",
                  "", *_goal_lines(abl["goals"], LABELS[ABLATION])]
    lines += ["", "## Cost at the site", ""]
    costs = summary["costs"]
    if costs:
        pf = [c["site_param_fraction"] for c in costs.values()]
        mf = [c["site_mac_fraction"] for c in costs.values()]
        lines.append(f"- A FedBone site holds {min(pf):.1%}-{max(pf):.1%} of the full model's parameters and computes "
                     f"{min(mf):.0%}-{max(mf):.0%} of its forward multiply-accumulates per image.")
        if all("site_step_peak_bytes" in c for c in costs.values()):
            mr = [c["site_step_peak_bytes"] / c["full_step_peak_bytes"] for c in costs.values()]
            lines.append(f"- Peak tensor memory of a site training step is {min(mr):.0%}-{max(mr):.0%} of training the "
                         "full model at the site (local-only, FedAvg).")
        fb = FEDBONE if FEDBONE in summary["traffic"] else "fedbone-mean"
        if "fedavg" in summary["traffic"]:
            ratios = []
            for name in costs:
                a = summary["traffic"][fb][name]
                b = summary["traffic"]["fedavg"][name]
                tot_b = b["bytes_sent_per_round"] + b["bytes_received_per_round"]
                if tot_b:
                    ratios.append((name, (a["bytes_sent_per_round"] + a["bytes_received_per_round"]) / tot_b))
            if ratios:
                lines.append("- Bytes per round (sent + received), FedBone / FedAvg: "
                             + ", ".join(f"{n} {r:.1f}x" for n, r in ratios) + ".")
    agg = summary["aggregation"].get(FEDBONE) or summary["aggregation"].get("fedbone-mean")
    if agg and agg["step"]:
        steps = len(agg["step"])
        with_conflict = sum(1 for c in agg["conflicting_pairs"] if c > 0)
        half = max(1, steps // 2)
        cos = agg["mean_cosine"]
        lines += ["", "## Conflicting gradients", "",
                  f"- {with_conflict} of {steps} steps had at least one conflicting pair of site gradients "
                  f"(mean {statistics.fmean(agg['conflicting_pairs']):.2f} of {agg['num_pairs'][0]} pairs per step).",
                  f"- Mean pairwise cosine: {statistics.fmean(cos[:half]):+.3f} in the first half of training, "
                  f"{statistics.fmean(cos[half:] or cos):+.3f} in the second."]
    if "central" in summary["methods"]:
        gaps = [summary["metrics"]["central"][n][i["primary_metric"]]["mean"]
                - summary["metrics"][FEDBONE][n][i["primary_metric"]]["mean"] for n, i in summary["sites"].items()]
        lines += ["", "## Centralised reference", "",
                  f"- Centralised minus FedBone (projection), primary metric: mean {statistics.fmean(gaps):+.3f} "
                  f"(range {min(gaps):+.3f} to {max(gaps):+.3f})."]
    return "\n".join(lines) + "\n"


def write_csv(summary: dict[str, Any], out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for m in summary["methods"]:
            for name, info in summary["sites"].items():
                for key in info["metrics"]:
                    c = summary["metrics"][m][name][key]
                    w.writerow({"method": m, "site": name, "metric": key,
                                "primary": int(key == info["primary_metric"]),
                                "mean": repr(c["mean"]), "std": repr(c["std"]), "n_seeds": len(c["values"]),
                                "values": ";".join(repr(v) for v in c["values"])})
    fields = ["site", "site_parameters", "full_parameters", "site_macs", "full_macs", "site_step_peak_bytes",
              "full_step_peak_bytes"] + [f"{m}_bytes_{d}_per_round" for m in summary["methods"] for d in
                                         ("sent", "received")]
    with (out / "costs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for name, c in summary["costs"].items():
            row: dict[str, Any] = {"site": name, **{k: c.get(k, "") for k in fields[1:7]}}
            for m in summary["methods"]:
                t = summary["traffic"][m][name]
                row[f"{m}_bytes_sent_per_round"] = t["bytes_sent_per_round"]
                row[f"{m}_bytes_received_per_round"] = t["bytes_received_per_round"]
            w.writerow(row)


def write_plots(summary: dict[str, Any], out: Path) -> list[str]:
    """Validation metric per round for every site and method; conflicts and cosines over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(summary["sites"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for m in summary["methods"]:
            c = summary["curves"][m][name]
            x = [r + 1 for r in c["rounds"]]
            ax.plot(x, c["mean"], marker="o", label=LABELS[m], linestyle="--" if m == "central" else "-")
            sd = [s if s == s else 0.0 for s in c["std"]]
            ax.fill_between(x, [a - b for a, b in zip(c["mean"], sd, strict=True)],
                            [a + b for a, b in zip(c["mean"], sd, strict=True)], alpha=0.15)
        ax.axhline(summary["sites"][name]["chance"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(summary["sites"][name]["primary_metric"])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    written.append("curves.png")
    if summary["aggregation"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
        for i, (m, agg) in enumerate(summary["aggregation"].items()):
            color = f"C{i}"
            a1.plot(agg["step"], agg["conflicting_pairs"], label=LABELS[m], linewidth=0.9, color=color)
            a2.plot(agg["step"], agg["mean_cosine"], label=f"{LABELS[m]}: mean", linewidth=0.9, color=color)
            a2.plot(agg["step"], agg["min_cosine"], label=f"{LABELS[m]}: min", linewidth=0.7, linestyle="--",
                    color=color)
        a1.set_xlabel("step")
        a1.set_ylabel("conflicting pairs (cos < 0)")
        a2.set_xlabel("step")
        a2.set_ylabel("cosine of site gradients")
        a2.axhline(0, color="grey", linewidth=0.8)
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "conflicts.png", dpi=110)
        plt.close(fig)
        written.append("conflicts.png")
    return written


def json_ready(obj: Any) -> Any:
    """A copy with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_markdown(summary))
    (out / "report.md").write_text(report_markdown(summary))
    write_csv(summary, out)
    summary["plots"] = write_plots(summary, out)
    summary["audit_logs"] = sorted(str(p.relative_to(out)) for p in out.glob("runs/*/**/audit/*.jsonl"))
    write_json_atomic(json_ready(summary), out / "results.json")

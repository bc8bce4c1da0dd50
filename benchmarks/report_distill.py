"""The docs/benchmarks.md section for benchmarks/results/distill.json (used by report.py)."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _cell(scores: dict[str, float]) -> str:
    return (
        f"{_pct(scores['accuracy'])} / {_pct(scores['category_accuracy'])} / {scores['loss']:.3f}"
    )


def distill_section(result: dict[str, Any] | None) -> list[str]:
    """Master vs experts vs one federation, per expert domain, and the 95% goal."""
    lines = ["## Distillation: expert adapters into one master", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/distill_quality.py`.", ""]
    federation, distill = result["federation"], result["distill"]
    domains = list(result["clusters"])
    scores = result["scores"]
    kl = result["distillation"]
    lines += [
        f"`python benchmarks/distill_quality.py` on `{result['model']}`: 4 ICD-10-CM hospitals "
        "(one specialty each) in 2 clusters, "
        + ", ".join(
            f"**{name}** ({' + '.join(sites)})" for name, sites in result["clusters"].items()
        )
        + f"; each cluster trains an expert in its own federation ({federation['run']['rounds']} "
        f"rounds of FedAvg, {federation['train']['local_steps']} local steps of "
        f"{federation['train']['batch_size']} examples, {federation['task']['examples_per_site']} "
        "records per site). The single model is one federation of all 4 sites with the same "
        f"settings. The master is distilled from the experts on {sum(kl['routed'].values())} "
        "public ICD-10-CM records (codes of the clusters' chapters that no site holds and the "
        f"gold set does not contain; label router): {distill['steps']} steps of "
        f"{distill['batch_size']}, temperature {distill['temperature']}, learning rate "
        f"{distill['learning_rate']}; its distillation loss on the transfer set fell from "
        f"{kl['kl_before']:.4f} to {kl['kl_after']:.4f}."
        + (
            " With the best-expert router (each record taught by the expert that predicts its "
            f"answer best: {result['best_expert_router']['routed']}) it fell from "
            f"{result['best_expert_router']['kl_before']:.4f} to "
            f"{result['best_expert_router']['kl_after']:.4f}."
            if "best_expert_router" in result
            else ""
        ),
        "",
        "Each cell: exact match / category (first 3 characters) / mean answer loss, on each "
        "expert's gold set (the gold codes of its own chapters) and on the whole gold set.",
        "",
        "| model | "
        + " | ".join(f"{d} gold ({scores['master'][d]['count']})" for d in domains)
        + f" | all gold ({scores['master']['all']['count']}) |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    labels = {
        "master": "**master (distilled)**",
        "master-best-expert": "master, best-expert router",
        "single": "single federation",
        "base": "base model",
    }
    extra = ["master-best-expert"] if "master-best-expert" in scores else []
    for name in ["master", *extra, *[f"expert:{d}" for d in domains], "single", "base"]:
        label = labels.get(name, f"expert {name.split(':', 1)[-1]}")
        cells = " | ".join(_cell(scores[name][d]) for d in [*domains, "all"])
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        f"Goal: the master keeps >= {_pct(result['goal_retained'])} of each expert's gold accuracy "
        "on that expert's domain.",
        "",
        "| domain | exact match kept | category kept | gold-loss gain over base kept | "
        "master loss - expert loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for domain, row in result["goal"].items():
        kept = [
            "undefined (expert 0%)" if row[key] is None else _pct(row[key])
            for key in ("accuracy_retained", "category_accuracy_retained")
        ]
        gain = _pct(row.get("loss_gain_kept"))
        lines.append(f"| {domain} | {kept[0]} | {kept[1]} | {gain} | {row['loss_gap']:+.3f} |")
    lines.append("")
    seconds = result["seconds"]
    lines += [
        "Wall time per stage (shared 2-core machine, other jobs running: noisy): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + f". Measured {result['measured_at']} on {result['machine']['cpus']} CPU cores; "
        "source: `benchmarks/results/distill.json`.",
        "",
    ]
    return lines

"""The docs/benchmarks.md section for benchmarks/results/distill.json (used by report.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LABELS = {
    "master": "**master (distilled)**",
    "master-best-expert": "master, best-expert router",
    "single": "single federation",
    "base": "base model",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _interval(figures: Mapping[str, Any], key: str) -> str:
    """``key``'s rate with its 95% interval where the figures hold one."""
    bounds = figures.get(f"{key}_ci95")
    if bounds is None:
        return _pct(figures[key])
    return f"{_pct(figures[key])} [{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}]"


def _headline_cell(figures: Mapping[str, Any]) -> str:
    return (
        f"{_interval(figures, 'category_accuracy')} / {_pct(figures['accuracy'])} / "
        f"{figures['loss']:.3f}"
    )


def _other_parts_cell(parts: Mapping[str, Any]) -> str:
    cells = []
    if "phrasing" in parts:
        phrasing = parts["phrasing"]
        cells.append(f"{_pct(phrasing['category_accuracy'])} / {_pct(phrasing['accuracy'])}")
    if "ranking" in parts:
        ranking = parts["ranking"]
        cells.append(f"{_pct(ranking['top1'])} / {_pct(ranking['top5'])}")
    return " · ".join(cells) or "-"


def _setup(result: Mapping[str, Any]) -> str:
    federation, distill = result["federation"], result["distill"]
    task, train, lora = federation["task"], federation["train"], federation["lora"]
    kl = result["distillation"]
    records = f"{task['examples_per_site']} codes each" + (
        " with their inclusion terms" if task.get("train_on_inclusion_terms") else ""
    )
    best = result.get("best_expert_router")
    momentum = federation["strategy"].get("server_momentum", 0.0)
    strategy = f"FedAvg with server momentum {momentum:g}" if momentum else "FedAvg"
    return (
        f"`python benchmarks/distill_quality.py` on `{result['model']}`: the demo's 4 ICD-10-CM "
        f"hospitals (one specialty each, {records}) in 2 clusters, "
        + ", ".join(
            f"**{name}** ({' + '.join(sites)})" for name, sites in result["clusters"].items()
        )
        + "; each cluster trains an expert in its own federation with the demo's shape as "
        "src/fedsilo/configs/demo.toml set it when this file was measured (the results record "
        f"it): {federation['run']['rounds']} rounds of {strategy}, "
        f"{train['local_steps']} local steps of {train['batch_size']} examples, learning rate "
        f"{train['learning_rate']} ({train.get('lr_schedule', 'constant')}, "
        f"{train.get('warmup_rounds', 0)} warmup round(s)), LoRA rank {lora['rank']} (alpha "
        f"{lora['alpha']}), max length {train['max_length']}. The single model is one "
        "federation of all 4 sites with the same settings. The master is distilled from the "
        f"experts on {sum(kl['routed'].values())} public ICD-10-CM records (codes of the "
        "clusters' chapters that no site holds and the gold set does not contain; label "
        f"router): {distill['steps']} steps of {distill['batch_size']}, temperature "
        f"{distill['temperature']}, learning rate {distill['learning_rate']}, max length "
        f"{distill['max_length']}; its distillation loss on the transfer set fell from "
        f"{kl['kl_before']:.4f} to {kl['kl_after']:.4f}."
        + (
            " With the best-expert router (each record taught by the expert that predicts its "
            f"answer best: {best['routed']}) it fell from {best['kl_before']:.4f} to "
            f"{best['kl_after']:.4f}."
            if best
            else ""
        )
    )


def _gold(result: Mapping[str, Any]) -> str:
    parts = result["scores"]["master"]["all"]["parts"]
    described = [f"(a) {parts['unseen-code']['count']} unseen codes of trained categories"]
    if "phrasing" in parts:
        described.append(f"(b) {parts['phrasing']['count']} unseen phrasings of trained codes")
    if "ranking" in parts:
        described.append(
            f"(c) {parts['ranking']['count']} ranking items (the reference code among "
            f"{parts['ranking']['candidates']} candidates of its chapter, by likelihood)"
        )
    return (
        "Every model is scored on each expert's domain of the ICD-10 gold standard (the gold "
        "records of its cluster's chapters; the two domains partition the whole set, checked "
        "by the benchmark): " + "; ".join(described) + ". The headline is category accuracy "
        "(first 3 characters right) on (a), with its 95% bootstrap interval over the domain's "
        'records; "all" pools the two domains (count-weighted means, no interval).'
    )


def distill_section(result: dict[str, Any] | None) -> list[str]:
    """Master vs experts vs one federation, per expert domain, and the 95% goal."""
    lines = ["## Distillation: expert adapters into one master", ""]
    if result is None:
        return [*lines, "Not measured yet: run `python benchmarks/distill_quality.py`.", ""]
    if result.get("goal_measure") != "category_accuracy":
        return [
            *lines,
            f"The stored result (measured {result['measured_at']}) predates the ICD-10 gold "
            "standard and the demo's training shape: rerun `python benchmarks/distill_quality.py`.",
            "",
        ]
    domains = list(result["clusters"])
    columns = [*domains, "all"]
    scores = result["scores"]
    extra = ["master-best-expert"] if "master-best-expert" in scores else []
    models = ["master", *extra, *[f"expert:{d}" for d in domains], "single", "base"]

    counts = {c: scores["master"][c]["count"] for c in columns}
    lines += [
        _setup(result),
        "",
        _gold(result),
        "",
        "(a) Unseen codes: category accuracy [95% interval] / exact match / mean answer loss, "
        "per expert domain (number of records in parentheses).",
        "",
        f"| model | {' | '.join(f'{c} ({counts[c]})' for c in columns)} |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in models:
        label = LABELS.get(name, f"expert {name.split(':', 1)[-1]}")
        cells = " | ".join(_headline_cell(scores[name][c]) for c in columns)
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "(b) Phrasings: category / exact match · (c) ranking: top-1 / top-5, per expert domain.",
        "",
        f"| model | {' | '.join(columns)} |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in models:
        label = LABELS.get(name, f"expert {name.split(':', 1)[-1]}")
        cells = " | ".join(_other_parts_cell(scores[name][c].get("parts", {})) for c in columns)
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        f"Goal: the master keeps >= {_pct(result['goal_retained'])} of each expert's category "
        "accuracy on unseen codes (a) on that expert's domain.",
        "",
        "| domain | expert category | master category | category kept | goal met | "
        "exact match kept | gold-loss gain over base kept | master loss - expert loss |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for domain, row in result["goal"].items():
        expert, master = scores[f"expert:{domain}"][domain], scores["master"][domain]
        kept = [
            "undefined (expert 0%)" if row[key] is None else _pct(row[key])
            for key in ("category_accuracy_retained", "accuracy_retained")
        ]
        met = {True: "yes", False: "no", None: "undefined"}[row.get("goal_met")]
        lines.append(
            f"| {domain} | {_interval(expert, 'category_accuracy')} | "
            f"{_interval(master, 'category_accuracy')} | {kept[0]} | {met} | {kept[1]} | "
            f"{_pct(row.get('loss_gain_kept'))} | {row['loss_gap']:+.3f} |"
        )
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

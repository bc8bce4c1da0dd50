"""Merge quality-benchmark results measured one algorithm per process into one file per seed.

    python benchmarks/gpu/merge.py --parts DIR --task T --label L --results-dir R --summary S

On a GPU each algorithm of ``fedsilo bench quality`` runs in its own process (they share
nothing but the seeded start), writing ``DIR/ALG/quality-gpu-T.json`` (seed 0) and
``...-seedS.json``. This writes ``R/quality-L.json`` and ``R/quality-L-seedS.json`` holding
every algorithm of that seed, the goals recomputed over them, and updates the summary entry
``L`` of ``S``, as one process running all algorithms would have. Identities must agree
except for the budget's learning rates and mu, which each process's own sweep chose: the
merged budget takes each algorithm's rate from the process that ran it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from fedsilo.bench.quality import summarize_goals
from fedsilo.bench.summary import update_summary
from fedsilo.storage import write_text_atomic

SAME = ("task", "model", "base_model_hash", "train", "lora", "metric", "gold_count")
CHOSEN = ("learning_rates", "proximal_mus")


def _seed_of(path: Path) -> int:
    found = re.search(r"-seed(\d+)\.json$", path.name)
    return int(found.group(1)) if found else 0


def _family(name: str) -> str:
    return "fedprox" if name.startswith("fedprox") else name


def merge_seed(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One seed's results: ``parts`` are (process algorithm, its results file)."""
    first = parts[0][1]
    merged = dict(first)
    algorithms: dict[str, Any] = {}
    edge: dict[str, Any] = {}
    rates: dict[str, float] = {}
    hyper: dict[str, Any] = {}
    reference = {k: v for k, v in first["budget"].items() if k not in CHOSEN}
    budget = dict(reference)
    for owner, data in parts:
        for key in SAME:
            if data.get(key) != first.get(key):
                raise ValueError(f"{owner}: field {key!r} differs from {parts[0][0]}'s")
        if {k: v for k, v in data["budget"].items() if k not in CHOSEN} != reference:
            raise ValueError(f"{owner}: budget differs from {parts[0][0]}'s")
        for name, result in data["algorithms"].items():
            if _family(name) != owner:
                continue  # measured here only as a means (e.g. FedAvg's rate for FedProx)
            algorithms[name] = result
            if name in data.get("edge_cases", {}):
                edge[name] = data["edge_cases"][name]
        chosen = dict(map(tuple, data["budget"]["learning_rates"]))
        if owner in chosen:
            rates[owner] = chosen[owner]
        if owner == "fedprox":
            budget["proximal_mus"] = data["budget"]["proximal_mus"]
        hyper[owner] = data["hyperparameters"]
        edge.setdefault("sizes", data.get("edge_cases", {}).get("sizes"))
    budget.setdefault("proximal_mus", first["budget"]["proximal_mus"])
    budget["learning_rates"] = sorted([k, v] for k, v in rates.items())
    central = next((d for o, d in parts if o == "centralized"), first)
    merged.update(
        budget=budget,
        algorithms=algorithms,
        edge_cases=edge,
        round0=central["round0"],
        goals=summarize_goals(algorithms, central["round0"]),
        hyperparameters={"chosen_by": "per algorithm", "per_algorithm": hyper},
        complete=all(d["complete"] for _, d in parts),
        wall_seconds=max(d["wall_seconds"] for _, d in parts),
        merged_from=[d.get("out_dir") for _, d in parts],
    )
    return merged


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", type=Path, required=True, help="one folder per algorithm")
    parser.add_argument("--task", required=True)
    parser.add_argument("--label", required=True, help="results file name: quality-LABEL.json")
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()
    by_seed: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for folder in sorted(p for p in args.parts.iterdir() if p.is_dir()):
        for path in sorted(folder.glob(f"quality-gpu-{args.task}*.json")):
            if path.name.endswith("-sweep.json") or "summary" in path.name:
                continue
            by_seed.setdefault(_seed_of(path), []).append(
                (folder.name, json.loads(path.read_text()))
            )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, parts in sorted(by_seed.items()):
        name = (
            f"quality-{args.label}.json" if seed == 0 else f"quality-{args.label}-seed{seed}.json"
        )
        path = args.results_dir / name
        merged = merge_seed(parts)
        write_text_atomic(path, json.dumps(merged, indent=2) + "\n")
        written.append(path)
        print(
            f"seed {seed}: {sorted(merged['algorithms'])} complete={merged['complete']} -> {path}"
        )
    if written:
        update_summary(args.summary, args.label, written)
        print(f"summary {args.summary}: entry {args.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Expert adapters distilled into one master, against the experts and a single federation.

    python benchmarks/distill_quality.py [--work runs/bench-distill] [--stage all|train]

Stages (each skipped when its output folder exists, so a stopped benchmark continues):

1. ``fedsilo simulate`` a clustered federation: 4 ICD-10 hospitals (one specialty each) in 2
   clusters of 2, one expert adapter per cluster;
2. ``fedsilo simulate`` the same 4 sites as one federation (the single-model baseline);
3. ``fedsilo transfer-set``: public ICD-10-CM descriptions of the clusters' chapters that no
   site holds and the gold set does not contain, labelled with their cluster's expert;
4. ``fedsilo distill``: the master adapter;
5. gold evaluation of master, experts and single model on each expert's gold set (the gold
   codes of its own chapters) and on the whole gold set.

Writes benchmarks/results/distill.json. Every setting is in this file; the budget is small
(a few CPU minutes per stage on SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import tomli_w
import torch

from fedsilo.cli.main import main as fedsilo_main

RESULTS = Path(__file__).parent / "results"

CLUSTERS = {
    "cardio-pulmonary": ["cardiology", "pulmonology"],
    "endo-musculoskeletal": ["endocrinology", "orthopedics"],
}

BASE_CONFIG: dict[str, Any] = {
    "run": {
        "name": "bench-distill",
        "seed": 0,
        "rounds": 3,
        "torch_threads": 1,
        "require_site_policies": False,
    },
    "model": {"base": "smollm2-135m-instruct"},
    "lora": {"rank": 8, "alpha": 16.0},
    "task": {
        "name": "icd10",
        "num_sites": 4,
        "partition": "by-chapter",
        "examples_per_site": 64,
        "gold_size": 64,
    },
    "train": {"local_steps": 12, "batch_size": 4, "learning_rate": 0.002, "max_length": 64},
    "strategy": {"name": "fedavg", "min_sites": 2},
    "evaluation": {"max_new_tokens": 8, "batch_size": 16},
}

DISTILL = {
    "per_expert": 48,
    "steps": 96,
    "batch_size": 4,
    "learning_rate": 0.002,
    "temperature": 2.0,
    "max_length": 64,
}
# Output folder -> router: the master is distilled once per router.
ROUTERS = {"master": "label", "master-best-expert": "best-expert"}
GOAL = 0.95  # the master keeps >= 95% of each expert's gold score on the expert's domain


def _config(work: Path, name: str, clustered: bool) -> Path:
    data = json.loads(json.dumps(BASE_CONFIG))
    data["run"]["name"] = name
    if clustered:
        data["clusters"] = {"method": "groups", "groups": CLUSTERS}
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _fedsilo(*argv: str) -> float:
    started = time.perf_counter()
    status = fedsilo_main(list(argv))
    if status != 0:
        raise SystemExit(f"fedsilo {' '.join(argv)} failed with exit status {status}")
    return time.perf_counter() - started


def _done(folder: Path) -> bool:
    """Whether a stage's folder holds a completed result (a failed one is an error)."""
    path = folder / "status.json"
    if not path.exists():
        return False
    status = json.loads(path.read_text())["status"]
    if status != "completed":
        raise SystemExit(f"{folder} is {status}: remove it to run that stage again")
    return True


def train(work: Path, seconds: dict[str, float]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if not _done(work / "clustered"):
        config = _config(work, "experts", clustered=True)
        seconds["experts"] = _fedsilo("simulate", str(config), "--out", str(work / "clustered"))
    if not _done(work / "single"):
        config = _config(work, "single", clustered=False)
        seconds["single"] = _fedsilo("simulate", str(config), "--out", str(work / "single"))


def distill_master(work: Path, seconds: dict[str, float]) -> None:
    transfer = work / "transfer.jsonl"
    if not transfer.exists():
        seconds["transfer_set"] = _fedsilo(
            "transfer-set",
            str(work / "clustered"),
            "--per-expert",
            str(DISTILL["per_expert"]),
            "--out",
            str(transfer),
        )
    for folder, router in ROUTERS.items():
        if _done(work / folder):
            continue
        seconds[f"distill:{router}"] = _fedsilo(
            "distill", "--experts", str(work / "clustered" / "experts"),
            "--transfer", str(transfer), "--out", str(work / folder), "--router", router,
            "--steps", str(DISTILL["steps"]), "--batch-size", str(DISTILL["batch_size"]),
            "--learning-rate", str(DISTILL["learning_rate"]),
            "--temperature", str(DISTILL["temperature"]),
            "--max-length", str(DISTILL["max_length"]),
        )  # fmt: skip


def _metrics(value: Any) -> dict[str, float]:
    return {
        "accuracy": value.accuracy,
        "category_accuracy": value.category_accuracy,
        "loss": value.loss,
        "count": value.count,
    }


def evaluate(work: Path) -> dict[str, Any]:
    """Every model on every expert's gold set; "all" is the union (count-weighted)."""
    from fedsilo.client.site import load_model_with_adapter
    from fedsilo.config import load_config
    from fedsilo.data.tasks import build_task
    from fedsilo.evaluation.gold import evaluate_gold
    from fedsilo.model.adapters import adapter_from_bytes, set_adapter_state

    clustered = work / "clustered"
    single_config = load_config(work / "single" / "config.toml")
    loaded = load_model_with_adapter(single_config)
    task = build_task(single_config.task, seed=single_config.run.seed)
    weights = "adapter_model.safetensors"
    adapters = {
        "base": loaded.adapter_template,
        **{
            folder: adapter_from_bytes((work / folder / "final" / weights).read_bytes())
            for folder in ROUTERS
        },
        "single": adapter_from_bytes((work / "single" / "final" / weights).read_bytes()),
    }
    for name in CLUSTERS:
        path = clustered / "experts" / name / weights
        adapters[f"expert:{name}"] = adapter_from_bytes(path.read_bytes())
    domains = {}
    for name in CLUSTERS:
        config = load_config(clustered / "clusters" / name / "config.toml")
        domains[name] = build_task(config.task, seed=config.run.seed).gold
    assert sum(len(g) for g in domains.values()) == len(task.gold)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for model_name, adapter in adapters.items():
        set_adapter_state(loaded.model, adapter)
        scores[model_name] = {}
        for domain, gold in domains.items():
            result = evaluate_gold(
                loaded.model,
                loaded.tokenizer,
                gold,
                system_prompt=task.system_prompt,
                max_new_tokens=single_config.evaluation.max_new_tokens,
                batch_size=single_config.evaluation.batch_size,
                max_length=single_config.train.max_length,
            )
            scores[model_name][domain] = _metrics(result)
        parts = list(scores[model_name].values())
        total = sum(p["count"] for p in parts)
        scores[model_name]["all"] = {
            key: sum(p[key] * p["count"] for p in parts) / total
            for key in ("accuracy", "category_accuracy", "loss")
        } | {"count": total}
        print(model_name, json.dumps(scores[model_name]))
    return scores


def _retained(master: float, expert: float) -> float | None:
    return None if expert == 0 else master / expert


def goal_rows(scores: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for name in CLUSTERS:
        expert, master = scores[f"expert:{name}"][name], scores["master"][name]
        base = scores["base"][name]
        rows[name] = {
            # Of the expert's gain over the base model in gold loss, the part the master keeps.
            "loss_gain_kept": _retained(
                base["loss"] - master["loss"], base["loss"] - expert["loss"]
            ),
            "accuracy_retained": _retained(master["accuracy"], expert["accuracy"]),
            "category_accuracy_retained": _retained(
                master["category_accuracy"], expert["category_accuracy"]
            ),
            "loss_gap": master["loss"] - expert["loss"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("runs") / "bench-distill")
    parser.add_argument("--stage", choices=["all", "train"], default="all")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    parser.add_argument("--model", help="base model folder (a smoke test on a tiny model)")
    args = parser.parse_args()
    if args.model:
        BASE_CONFIG["model"]["base"] = str(Path(args.model).resolve())
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    timing = args.work / "seconds.json"
    train(args.work, seconds)
    previous = json.loads(timing.read_text()) if timing.exists() else {}
    timing.write_text(json.dumps({**previous, **seconds}, indent=2))
    if args.stage == "train":
        return
    distill_master(args.work, seconds)
    started = time.perf_counter()
    scores = evaluate(args.work)
    seconds["evaluation"] = time.perf_counter() - started
    seconds = {**previous, **seconds}
    timing.write_text(json.dumps(seconds, indent=2))
    master_metrics = json.loads((args.work / "master" / "metrics.json").read_text())
    best_metrics = json.loads((args.work / "master-best-expert" / "metrics.json").read_text())
    result = {
        "benchmark": "distill-quality",
        "model": BASE_CONFIG["model"]["base"],
        "clusters": CLUSTERS,
        "federation": BASE_CONFIG,
        "distill": DISTILL,
        "goal_retained": GOAL,
        "distillation": {
            key: master_metrics[key] for key in ("kl_before", "kl_after", "routed", "answer_tokens")
        },
        "best_expert_router": {
            key: best_metrics[key] for key in ("kl_before", "kl_after", "routed", "answer_tokens")
        },
        "scores": scores,
        "goal": goal_rows(scores),
        "seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goal"], indent=2))


if __name__ == "__main__":
    main()

"""The quality benchmark's settings: its named tasks and its budget (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Named task settings; the budget adds num_sites, examples_per_site and gold_size.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "icd10-alpha0.1": {"name": "icd10", "partition": "dirichlet", "alpha": 0.1},
    "icd10-alpha1": {"name": "icd10", "partition": "dirichlet", "alpha": 1.0},
    "icd10-alpha10": {"name": "icd10", "partition": "dirichlet", "alpha": 10.0},
    "icd10-by-specialty": {"name": "icd10", "partition": "by-chapter"},
    "drug-review": {"name": "drug-review"},
    "shakespeare": {"name": "shakespeare"},
}

# Per task family: prompt length that fits its records, and tokens to generate.
LENGTHS: dict[str, tuple[int, int]] = {
    "icd10": (96, 8),
    "drug-review": (160, 3),
    "shakespeare": (96, 1),  # next-token metric: nothing is generated
}

METRIC_MEANING: dict[str, dict[str, str]] = {
    "code": {
        "gold_accuracy": "exact ICD-10-CM code (dot ignored)",
        "gold_category_accuracy": "same 3-character category",
    },
    "sentiment": {
        "gold_accuracy": "rating class (negative / neutral / positive)",
        "gold_category_accuracy": "rating class at most one step away",
    },
    "next-token": {
        "gold_accuracy": "teacher-forced top-1 next-token accuracy on the reference line",
        "gold_category_accuracy": "teacher-forced top-5 next-token accuracy",
    },
}

FEDERATED = ("fedavg", "fedprox", "fedadam", "ffa-lora")
ALL_ALGORITHMS = ("centralized", "local", *FEDERATED)


@dataclass(frozen=True)
class QualityBudget:
    """The one budget every algorithm gets."""

    num_sites: int = 8
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 2e-3
    examples_per_site: int = 32
    gold_size: int = 32
    lora_rank: int = 8
    proximal_mus: tuple[float, ...] = (0.01, 0.1)
    server_learning_rate: float = 0.01
    seed: int = 0
    edge_cases_per_kind: int = 12
    max_length: int | None = None  # None: the task family's default
    max_new_tokens: int | None = None

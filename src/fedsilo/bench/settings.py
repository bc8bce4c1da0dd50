"""The quality benchmark's settings: its named tasks and its budget (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
    """The one budget every algorithm gets.

    Local work is ``local_steps`` batches per round, or, when ``local_epochs`` is set, that many
    passes over each site's records (centralized then takes, per round, the sum of the sites'
    steps over the pooled records). Every algorithm, centralized and local-only included,
    trains round r at ``round_learning_rate(learning_rate, lr_schedule, warmup_rounds)``;
    ``learning_rates`` overrides the base rate per algorithm (as chosen by a sweep on the
    validation split, ``validation_share`` of each site's records, never on a gold set).
    """

    num_sites: int = 8
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 2e-3
    examples_per_site: int | Literal["all"] = 32
    gold_size: int = 32
    lora_rank: int = 8
    proximal_mus: tuple[float, ...] = (0.01, 0.1)
    server_learning_rate: float = 0.01
    # FedAvg's Nesterov server momentum (strategy.server_momentum), also for FedProx and
    # FFA-LoRA; FedAdam has its own first moment and runs without it.
    server_momentum: float = 0.0
    seed: int = 0
    edge_cases_per_kind: int = 12
    max_length: int | None = None  # None: the task family's default
    max_new_tokens: int | None = None
    local_epochs: float | None = None  # set: local work in epochs, local_steps unused
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_rounds: int = 0
    validation_share: float = 0.0
    gold_phrasings: int = 0  # ICD-10 gold part b (inclusion terms of trained codes)
    gold_ranking_candidates: int = 0  # ICD-10 gold part c (closed-set ranking among k)
    # Learning-curve points: the gold set is scored after every N-th round and the last one
    # (scoring costs about a short round; converged budgets have tens of rounds).
    gold_every_rounds: int = 1
    train_on_inclusion_terms: bool = False
    # (algorithm, base learning rate) pairs that replace ``learning_rate`` for that algorithm.
    learning_rates: tuple[tuple[str, float], ...] = ()

    def learning_rate_for(self, algorithm: str) -> float:
        """The base learning rate of ``algorithm`` ("fedprox-mu0.1" counts as "fedprox")."""
        family = "fedprox" if algorithm.startswith("fedprox") else algorithm
        return dict(self.learning_rates).get(family, self.learning_rate)


def headline_metric(task_name: str) -> str:
    """The metric a task's summary is read on: category accuracy on gold a for ICD-10."""
    return "gold_category_accuracy" if task_name == "icd10" else "gold_accuracy"

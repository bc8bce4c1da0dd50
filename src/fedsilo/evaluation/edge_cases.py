"""Scoring the ICD-10 edge-case sets (fedsilo.data.icd10_edge), each reported on its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.data.icd10_edge import EdgeCaseSet
from fedsilo.evaluation.bootstrap import bootstrap_ci
from fedsilo.evaluation.gold import generate_answers
from fedsilo.evaluation.metrics import code_category_match, code_exact_match, looks_like_code


@dataclass(frozen=True)
class EdgeScore:
    """One edge-case set's scores; accuracies are None where there is no reference answer.

    The intervals are 95% percentile-bootstrap intervals over the set's records.
    """

    kind: str
    count: int
    accuracy: float | None
    category_accuracy: float | None
    code_shaped_rate: float  # answers shaped like an ICD-10-CM code, right or wrong
    accuracy_ci95: tuple[float, float] | None = None
    category_accuracy_ci95: tuple[float, float] | None = None


def score_edge_answers(case_set: EdgeCaseSet, answers: list[str]) -> EdgeScore:
    """Score ``answers`` (aligned with ``case_set.records``) the way the set asks."""
    if len(answers) != len(case_set.records):
        raise ValueError(
            f"{case_set.kind}: {len(answers)} answers for {len(case_set.records)} cases"
        )
    count = len(answers)
    if count == 0:
        return EdgeScore(case_set.kind, 0, None, None, 0.0)
    shaped = sum(looks_like_code(answer) for answer in answers) / count
    if case_set.scoring == "code-shaped":
        return EdgeScore(case_set.kind, count, None, None, shaped)
    pairs = list(zip(answers, (r.response for r in case_set.records), strict=True))
    exact = [float(code_exact_match(a, r)) for a, r in pairs]
    category = [float(code_category_match(a, r)) for a, r in pairs]
    return EdgeScore(
        kind=case_set.kind,
        count=count,
        accuracy=sum(exact) / count,
        category_accuracy=sum(category) / count,
        code_shaped_rate=shaped,
        accuracy_ci95=bootstrap_ci(exact),
        category_accuracy_ci95=bootstrap_ci(category),
    )


def evaluate_edge_cases(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cases: Mapping[str, EdgeCaseSet],
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
) -> dict[str, EdgeScore]:
    """Greedy answers to every edge case (prompts cut to ``max_length`` as at training)."""
    was_training = model.training
    model.train(False)
    try:
        scores = {}
        for kind, case_set in cases.items():
            answers = generate_answers(
                model,
                tokenizer,
                [record.prompt for record in case_set.records],
                system_prompt=system_prompt,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_prompt_length=max_length,
            )
            scores[kind] = score_edge_answers(case_set, answers)
    finally:
        model.train(was_training)
    return scores

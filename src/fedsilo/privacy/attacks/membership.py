"""Membership inference by loss threshold (Yeom et al. 2018).

The attack guesses "member" for a record whose loss under the model is below a threshold;
training lowers the loss of the records it saw. Its power over every threshold is the area
under the ROC curve: the probability that a random member has a lower loss than a random
non-member, ties counting one half (the Mann-Whitney U statistic divided by the number of
pairs). 0.5 means the losses reveal nothing about membership, 1.0 that they reveal it fully.
On a few dozen records an AUC moves by several hundredths by chance alone, so it is reported
with a 95% bootstrap interval (:func:`loss_threshold_auc_ci`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from fedsilo.evaluation.gold import answer_losses


def _checked(losses: Sequence[float], *, name: str) -> np.ndarray:
    if len(losses) == 0:
        raise ValueError(f"{name} is empty: the AUC needs at least one loss on each side")
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of losses, got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is not finite: {values[bad[0]]}")
    return values


def loss_threshold_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """Exact AUC of the attack that says "member" when the loss is low; ties count 1/2.

    Computed over all member/non-member pairs in O(n log n). Raises ValueError for an empty
    side or a loss that is not finite (naming the side and index).
    """
    members = _checked(member_losses, name="member_losses")
    nonmembers = np.sort(_checked(nonmember_losses, name="nonmember_losses"))
    # For each member: non-members with a higher loss (attack right) and equal loss (a tie).
    at_or_below = np.searchsorted(nonmembers, members, side="right")
    below = np.searchsorted(nonmembers, members, side="left")
    higher = int(np.sum(len(nonmembers) - at_or_below))
    ties = int(np.sum(at_or_below - below))
    # Integer counts until the one division, so the result is exact up to that rounding.
    return (2 * higher + ties) / (2 * len(members) * len(nonmembers))


def loss_threshold_auc_ci(
    member_losses: Sequence[float],
    nonmember_losses: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of :func:`loss_threshold_auc`.

    Members and non-members are resampled apart (each side keeps its size), ``resamples``
    times from a generator seeded by ``seed``, so the same losses give the same interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    members = _checked(member_losses, name="member_losses")
    nonmembers = _checked(nonmember_losses, name="nonmember_losses")
    rng = np.random.default_rng(seed)
    figures = [
        loss_threshold_auc(
            members[rng.integers(0, len(members), len(members))].tolist(),
            nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))].tolist(),
        )
        for _ in range(resamples)
    ]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(figures, [tail, 100 - tail])
    return float(low), float(high)


def membership_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    members: Sequence[ChatRecord],
    nonmembers: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    batch_size: int,
    max_length: int,
) -> tuple[list[float], list[float]]:
    """Each member's and non-member's answer loss under ``model`` (the attack's scores).

    Each record's loss is the mean cross-entropy of its answer given its prompt, encoded as
    for training with ``max_length``. The model is scored in eval mode and left as it was.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.train(False)
    try:
        member_losses, nonmember_losses = (
            answer_losses(
                model,
                tokenizer,
                records,
                system_prompt=system_prompt,
                max_length=max_length,
                batch_size=batch_size,
            )
            for records in (members, nonmembers)
        )
    finally:
        model.train(was_training)
    return member_losses, nonmember_losses


def membership_auc(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    members: Sequence[ChatRecord],
    nonmembers: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    batch_size: int,
    max_length: int,
) -> float:
    """Loss-threshold AUC of ``members`` (trained on) against ``nonmembers`` under ``model``
    (their losses from :func:`membership_losses`)."""
    return loss_threshold_auc(
        *membership_losses(
            model,
            tokenizer,
            members,
            nonmembers,
            system_prompt=system_prompt,
            batch_size=batch_size,
            max_length=max_length,
        )
    )

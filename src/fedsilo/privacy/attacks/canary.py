"""Planted canaries and their exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a made-up clinical note holding a random secret, a medical record number of
``digits`` decimal digits; the secret space has ``10**digits`` members (6 digits: one million).
It is planted in a site's training data some number of times. After training, the exposure of
the canary says how much more likely the model finds the true secret than other secrets in the
same note: a model that never saw the canary ranks the true secret like any other, one that
memorised it ranks it first.

How a canary appears in training data: a chat record whose prompt is :data:`CANARY_PROMPT` and
whose response is the filled :data:`CANARY_TEMPLATE`, e.g. ``"Patient Ada Kowalski MRN 048213
was seen today."``. Its likelihood is the total log-probability of the response given the
prompt, the same tokens the loss trains on (:func:`sequence_log_likelihood`). Every candidate
shares the prompt and the text before the secret, so candidates differ only in the secret's
tokens and in how the text after it is predicted from them.

Exposure is estimated by sampling, as in the paper: the true secret is ranked among
``candidates`` other secrets drawn uniformly without replacement from the rest of the secret
space, and

    exposure = log2(candidates + 1) - log2(rank)

with rank 1 for the most likely secret. It ranges from 0 (the true secret is least likely) to
log2(candidates + 1) (most likely); a model that never saw the canary gives rank uniform on
1..candidates+1, whose expected exposure is close to log2(e) ~ 1.44 bits. Ties count against the
canary: a candidate exactly as likely as the true secret is ranked ahead of it, so an untrained
or constant model never shows exposure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.data.records import ChatRecord, Record
from fedsilo.evaluation.gold import answer_scores

CANARY_PROMPT = "Write the clinical note."
"""The prompt of every canary record; the note itself is the response."""

CANARY_TEMPLATE = "Patient {name} MRN {secret} was seen today."
"""The note a canary plants; ``{secret}`` is the random record number."""

MAX_DIGITS = 18
"""Longest secret supported: ``10**18`` still fits numpy's int64 sampling."""

# Fictional names, so a canary can never coincide with a real patient in a site's data.
_FIRST_NAMES = ("Ada", "Bram", "Cora", "Dov", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas")
_LAST_NAMES = ("Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrova", "Quist")

LogLikelihood = Callable[[Sequence[ChatRecord]], Sequence[float]]
"""Scores records: one log-probability of the response given the prompt per record."""


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``record.response`` is ``text_prefix + secret + <rest of the note>``.

    ``text_prefix`` is the part of the response before the secret, which an attacker who knows
    the template and the patient is assumed to know.
    """

    secret: str
    text_prefix: str
    record: ChatRecord

    def __post_init__(self) -> None:
        if not self.secret.isascii() or not self.secret.isdigit():
            raise ValueError(f"canary secret must be decimal digits, got {self.secret!r}")
        if len(self.secret) > MAX_DIGITS:
            raise ValueError(f"canary secret has {len(self.secret)} digits, at most {MAX_DIGITS}")
        if not self.record.response.startswith(self.text_prefix + self.secret):
            raise ValueError(
                f"canary record response {self.record.response!r} does not start with "
                f"text_prefix + secret ({self.text_prefix + self.secret!r})"
            )

    @property
    def digits(self) -> int:
        """Length of the secret; the secret space has ``10**digits`` members."""
        return len(self.secret)

    def with_secret(self, secret: str) -> ChatRecord:
        """The canary's record with ``secret`` (same digit count) in place of the true one."""
        if len(secret) != self.digits or not secret.isascii() or not secret.isdigit():
            raise ValueError(f"a candidate secret must be {self.digits} digits, got {secret!r}")
        suffix = self.record.response[len(self.text_prefix) + self.digits :]
        return ChatRecord(prompt=self.record.prompt, response=self.text_prefix + secret + suffix)


def _check_digits(digits: int) -> None:
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits must be between 1 and {MAX_DIGITS}, got {digits}")


def _format_secret(value: int, digits: int) -> str:
    return f"{value:0{digits}d}"


def make_canaries(count: int, *, digits: int, rng: np.random.Generator) -> list[Canary]:
    """``count`` canaries with distinct secrets drawn uniformly from ``10**digits`` values.

    Each gets a fictional patient name; the same generator state gives the same canaries.
    """
    _check_digits(digits)
    space = 10**digits
    if not 0 <= count <= space:
        raise ValueError(f"count must be between 0 and {space} for {digits} digits, got {count}")
    values = rng.choice(space, size=count, replace=False)
    canaries = []
    for value in values:
        name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        secret = _format_secret(int(value), digits)
        prefix = CANARY_TEMPLATE[: CANARY_TEMPLATE.index("{secret}")].format(name=name)
        response = CANARY_TEMPLATE.format(name=name, secret=secret)
        record = ChatRecord(prompt=CANARY_PROMPT, response=response)
        canaries.append(Canary(secret=secret, text_prefix=prefix, record=record))
    return canaries


_R = TypeVar("_R", bound=Record)


def plant(
    records: Sequence[_R],
    canaries: Sequence[Canary],
    *,
    repeats: int,
    rng: np.random.Generator,
) -> list[_R | ChatRecord]:
    """A new list: ``records`` in their order, with each canary's record ``repeats`` times.

    The copies take positions drawn uniformly from the combined list (so their order among
    themselves is random too); ``records`` itself is not modified. The same generator state
    gives the same list.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    copies = [canary.record for canary in canaries for _ in range(repeats)]
    total = len(records) + len(copies)
    positions = rng.choice(total, size=len(copies), replace=False)
    planted: list[_R | ChatRecord | None] = [None] * total
    for position, copy in zip(positions, copies, strict=True):
        planted[int(position)] = copy
    originals = iter(records)
    return [entry if entry is not None else next(originals) for entry in planted]


def sequence_log_likelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    batch_size: int,
) -> list[float]:
    """Total log-probability (nats) of each record's response, eos included, given its prompt.

    The record is encoded exactly as for training (chat template, answer tokens plus eos), with
    no truncation. The model is scored in eval mode and left in the mode it was in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not records:
        return []
    was_training = model.training
    model.train(False)
    try:
        scores = answer_scores(
            model,
            tokenizer,
            records,
            system_prompt=system_prompt,
            max_length=2**62,  # no truncation
            batch_size=batch_size,
        )
    finally:
        model.train(was_training)
    return scores.log_likelihoods


def exposure_from_log_likelihoods(
    true_log_likelihood: float, candidate_log_likelihoods: Sequence[float]
) -> float:
    """``log2(len(candidates) + 1) - log2(rank)`` of the true secret, ties ranked ahead of it."""
    if not candidate_log_likelihoods:
        raise ValueError("exposure needs at least one candidate")
    scores = np.asarray(candidate_log_likelihoods, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"candidate log-likelihood at index {int(bad[0])} is not finite: {scores[bad[0]]}"
        )
    if not math.isfinite(true_log_likelihood):
        raise ValueError(f"true log-likelihood is not finite: {true_log_likelihood}")
    rank = 1 + int(np.count_nonzero(scores >= true_log_likelihood))
    return math.log2(len(scores) + 1) - math.log2(rank)


def exposure_p_value(exposures: Sequence[float]) -> float:
    """Probability that canaries never seen in training reach at least this total exposure.

    For a canary the model never saw, its secret is exchangeable with the random candidates, so
    its rank is uniform and ``2**-exposure = rank / (candidates + 1)`` is a p-value. Fisher's
    method combines the canaries: with ``k`` of them, ``ln 2 * sum(exposures)`` is a Gamma(k, 1)
    variable under that null hypothesis, and this returns its survival function
    ``exp(-s) * sum_{i<k} s**i / i!``. The ranks are discrete and ties count against the
    canary, so the p-value is conservative: a small value is real evidence of memorisation.
    """
    if not exposures:
        raise ValueError("exposure_p_value needs at least one exposure")
    values = np.asarray(exposures, dtype=np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"exposures must be finite and non-negative, got {list(exposures)}")
    total = math.log(2) * float(values.sum())
    term, tail = 1.0, 1.0
    for i in range(1, len(values)):
        term *= total / i
        tail += term
    return min(1.0, math.exp(-total) * tail)


def candidate_secrets(canary: Canary, *, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct secrets of the canary's length, uniform over all but the true one."""
    space = 10**canary.digits
    if not 1 <= count <= space - 1:
        raise ValueError(
            f"candidates must be between 1 and {space - 1} for {canary.digits} digits, got {count}"
        )
    true_value = int(canary.secret)
    # Draw from a space one smaller and shift values at or above the true one past it.
    values = rng.choice(space - 1, size=count, replace=False)
    return [_format_secret(int(v) + (int(v) >= true_value), canary.digits) for v in values]


def exposure_with(
    log_likelihood: LogLikelihood,
    canary: Canary,
    *,
    candidates: int,
    rng: np.random.Generator,
) -> float:
    """The canary's exposure (module docstring) with ``log_likelihood`` as the scorer."""
    others = [
        canary.with_secret(secret)
        for secret in candidate_secrets(canary, count=candidates, rng=rng)
    ]
    # One call for all, so every record is scored the same way.
    scores = list(log_likelihood([canary.record, *others]))
    if len(scores) != len(others) + 1:
        raise ValueError(f"scorer returned {len(scores)} scores for {len(others) + 1} records")
    return exposure_from_log_likelihoods(scores[0], scores[1:])


def exposure(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    canary: Canary,
    *,
    candidates: int,
    rng: np.random.Generator,
    system_prompt: str | None,
    batch_size: int,
) -> float:
    """The canary's exposure under ``model``, in bits, at most ``log2(candidates + 1)``.

    See the module docstring for the estimate and its range.
    """

    def score(records: Sequence[ChatRecord]) -> list[float]:
        return sequence_log_likelihood(
            model, tokenizer, records, system_prompt=system_prompt, batch_size=batch_size
        )

    return exposure_with(score, canary, candidates=candidates, rng=rng)

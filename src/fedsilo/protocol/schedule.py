"""How much local work a round asks for, and at which learning rate: pure functions.

The coordinator sets the learning rate of each round from the run's schedule and sends it in
the round task; a site turns a budget given in epochs into optimizer steps for its own dataset
size, which it never has to release.
"""

from __future__ import annotations

import math
from typing import Literal

LrSchedule = Literal["constant", "cosine"]


def local_steps_for(
    *, local_steps: int, local_epochs: float, batch_size: int, num_examples: int
) -> int:
    """Optimizer steps of one round: ``local_steps``, or ``local_epochs`` passes over the data.

    Exactly one of ``local_steps`` and ``local_epochs`` is positive (the other 0, as the round
    task carries them). An epoch is ``ceil(num_examples / batch_size)`` batches (a site with
    fewer records than a batch takes them all in one batch); a fraction of an epoch rounds up,
    so every round trains at least one step.
    """
    if (local_steps > 0) == (local_epochs > 0):
        raise ValueError(
            f"exactly one of local_steps ({local_steps}) and local_epochs ({local_epochs}) "
            "must be positive"
        )
    if local_steps > 0:
        return local_steps
    if not math.isfinite(local_epochs):
        raise ValueError(f"local_epochs must be finite, got {local_epochs}")
    if batch_size < 1 or num_examples < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and num_examples ({num_examples}) must be positive"
        )
    batches_per_epoch = math.ceil(num_examples / batch_size)
    return max(1, math.ceil(local_epochs * batches_per_epoch))


def private_local_steps(
    *, local_steps: int, local_epochs: float, batch_size: int, sampling_rate: float
) -> int:
    """The steps a record-level DP round must declare, from the sampling rate it declares.

    A private site samples each record with ``q = min(1, batch_size / records)`` and trains
    :func:`local_steps_for` steps for its ``records``. Its DP event carries ``q`` (ledgered
    with the update), and ``q`` determines the record count exactly: ``round(batch_size / q)``
    when ``q < 1`` (a float64 quotient is within ``records * 2**-52`` of it), and at ``q = 1``
    every size up to ``batch_size`` gives one batch per epoch. So the coordinator computes the
    very step count the site trained and accounted, with nothing released beyond the event.

    Raises:
        ValueError: ``sampling_rate`` not in (0, 1] or implying more than 2**53 records, or the
            budget is invalid (see :func:`local_steps_for`).
    """
    if local_steps > 0:
        return local_steps_for(
            local_steps=local_steps, local_epochs=local_epochs, batch_size=1, num_examples=1
        )
    if not (math.isfinite(sampling_rate) and 0.0 < sampling_rate <= 1.0):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    records = batch_size / sampling_rate
    if not records <= 2.0**53:
        raise ValueError(f"sampling_rate {sampling_rate} implies more than 2**53 records")
    return local_steps_for(
        local_steps=0,
        local_epochs=local_epochs,
        batch_size=batch_size,
        num_examples=batch_size if sampling_rate >= 1.0 else round(records),
    )


def round_learning_rate(
    base: float, *, round_number: int, rounds: int, schedule: LrSchedule, warmup_rounds: int
) -> float:
    """The learning rate of round ``round_number`` (1 to ``rounds``).

    "constant": ``base`` every round. "cosine": round r of the first ``warmup_rounds`` trains at
    ``base * r / (warmup_rounds + 1)``, then the rate follows a half cosine from ``base`` (the
    first round after warmup) down to ``base / 2 * (1 + cos(pi * (n - 1) / n))`` in the last
    of the ``n`` decay rounds, so no round trains at zero.
    """
    if not 1 <= round_number <= rounds:
        raise ValueError(f"round {round_number} is outside 1..{rounds}")
    if warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must not be negative, got {warmup_rounds}")
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if round_number <= warmup_rounds:
        return base * round_number / (warmup_rounds + 1)
    decay_rounds = max(1, rounds - warmup_rounds)
    progress = (round_number - warmup_rounds - 1) / decay_rounds
    return base * 0.5 * (1 + math.cos(math.pi * progress))

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

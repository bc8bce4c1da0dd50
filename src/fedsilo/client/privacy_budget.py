"""A site's privacy budget: what it has spent, what the next round would cost, and refusing.

The site keeps every DP event it has released in its own storage (``privacy-spent.json``),
across runs, and composes them with dp-accounting. Before training it works out the event the
round would add (its sampling rate depends on its own dataset size, which it never releases)
and refuses the round if the total would exceed its policy's ``max_epsilon`` at its ``delta``.
An event is recorded before the update leaves the site: released is spent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedsilo.client.policy import SitePolicy, TaskRefusedError
from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.privacy.calibration import calibrate_noise_multiplier
from fedsilo.privacy.events import DpEvent, PoissonGaussianEvent, event_from_json, event_to_json
from fedsilo.protocol.records import DpTask, RoundTask
from fedsilo.storage import read_json_value, write_text_atomic


def _read_record(path: Path) -> tuple[list[dict[str, object]], list[DpEvent]]:
    """The entries of the site's record and the events they hold (none if the file is absent);
    ValueError naming the file and entry when damaged (the site then refuses to train rather
    than guess what it has spent)."""
    if not path.exists():
        return [], []
    try:
        entries = read_json_value(path)
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON list of released DP events ({error})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: not a JSON list of released DP events")
    events = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "event" not in entry:
            raise ValueError(f"{path}: entry {index} is not an object with an 'event'")
        try:
            events.append(event_from_json(entry["event"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: entry {index} holds no valid DP event ({error})") from None
    return entries, events


def read_spent(path: Path) -> list[DpEvent]:
    """Every DP event this site has released, oldest first (none if the file is absent)."""
    return _read_record(path)[1]


def record_spent(path: Path, *, run_id: str, round_number: int, event: DpEvent) -> None:
    """Append one released event to the site's record (rewritten atomically); a record that
    does not read back whole is refused, never rewritten."""
    entries, _ = _read_record(path)
    entries.append({"run_id": run_id, "round": round_number, "event": event_to_json(event)})
    write_text_atomic(path, json.dumps(entries, indent=2) + "\n")


def plan_round_event(dp: DpTask, task: RoundTask, *, num_examples: int) -> PoissonGaussianEvent:
    """The DP-SGD event this site's round will be: its own sampling rate and noise."""
    sampling_rate = min(1.0, task.batch_size / num_examples)
    steps = task.steps_for(num_examples)
    noise = dp.noise_multiplier
    if dp.target_epsilon > 0:
        # The run's target covers all planned rounds of this site, each with local_steps steps.
        noise = calibrate_noise_multiplier(
            target_epsilon=dp.target_epsilon,
            delta=dp.delta,
            sampling_rate=sampling_rate,
            steps=steps * dp.planned_rounds,
            accountant=dp.accountant,
        )
    return PoissonGaussianEvent(noise_multiplier=noise, sampling_rate=sampling_rate, steps=steps)


def check_budget(
    policy: SitePolicy | None,
    *,
    dp: DpTask | None,
    event: DpEvent | None,
    spent: Sequence[DpEvent],
    site: str,
) -> None:
    """Refuse (TaskRefusedError) a round the site's budget does not allow."""
    privacy = policy.privacy if policy is not None else None
    if privacy is None or privacy.max_epsilon is None or privacy.delta is None:
        return
    max_epsilon, delta = privacy.max_epsilon, privacy.delta
    if dp is None or event is None:
        raise TaskRefusedError(
            f"site {site}: policy sets a privacy budget (epsilon {max_epsilon:g}); "
            "this round is not differentially private"
        )
    if event.noise_multiplier <= 0:
        raise TaskRefusedError(f"site {site}: the round adds no noise; policy sets a budget")
    accountant = dp.accountant
    after = compute_epsilon([*spent, event], delta=delta, accountant=accountant)
    if after > max_epsilon:
        before = compute_epsilon(list(spent), delta=delta, accountant=accountant)
        raise TaskRefusedError(
            f"site {site}: this round would bring epsilon from {before:.3f} to {after:.3f} at "
            f"delta {delta:g}, over the policy's budget of {max_epsilon:g}"
        )

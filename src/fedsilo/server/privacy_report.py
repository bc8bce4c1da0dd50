"""Epsilon per site, recomputed from the DP events in the ledger alone.

Each accepted update under record-level DP carries the site's DP event (noise multiplier,
sampling rate, steps), ledgered with it. A site's epsilon is the composition of its events
with dp-accounting; anyone holding the ledger can recompute it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from fedsilo.ledger import Entry, EntryKind
from fedsilo.privacy.accounting import AccountantName, compute_epsilon
from fedsilo.privacy.events import DpEvent, event_from_json


def site_events(entries: Sequence[Entry]) -> dict[str, list[DpEvent]]:
    """Each site's DP events, in ledger order, from its accepted updates."""
    events: dict[str, list[DpEvent]] = defaultdict(list)
    for entry in entries:
        if entry.kind is not EntryKind.UPDATE_RECEIVED:
            continue
        raw = entry.payload.get("dp_event")
        if isinstance(raw, dict):
            events[str(entry.payload["site_id"])].append(event_from_json(raw))
    return dict(events)


def entries_through_round(entries: Sequence[Entry], last_round: int) -> list[Entry]:
    """The ledger as it stood when round ``last_round``'s figures were written.

    Every entry before the first one of a later round: a run that is still going (or stopped
    in a round it did not finish) has ledgered updates that no reported figure includes yet.
    """
    for position, entry in enumerate(entries):
        number = entry.payload.get("round")
        if isinstance(number, int) and number > last_round:
            return list(entries[:position])
    return list(entries)


def site_epsilons(
    entries: Sequence[Entry], *, delta: float, accountant: AccountantName
) -> dict[str, float]:
    """Epsilon spent so far by each site that released DP updates."""
    return {
        site: compute_epsilon(events, delta=delta, accountant=accountant)
        for site, events in sorted(site_events(entries).items())
    }


def site_level_events(entries: Sequence[Entry]) -> list[DpEvent]:
    """The coordinator's site-level DP events, one per aggregated round, in ledger order."""
    events: list[DpEvent] = []
    for entry in entries:
        if entry.kind is not EntryKind.ROUND_AGGREGATED:
            continue
        raw = entry.payload.get("site_dp_event")
        if isinstance(raw, dict):
            events.append(event_from_json(raw))
    return events


def site_level_epsilon(
    entries: Sequence[Entry],
    *,
    delta: float,
    accountant: AccountantName,
    pending: Sequence[DpEvent] = (),
) -> float:
    """Epsilon of the released global adapter w.r.t. any one site's whole data.

    ``pending`` are events of a round being aggregated, not yet in ``entries``.
    """
    events = [*site_level_events(entries), *pending]
    return compute_epsilon(events, delta=delta, accountant=accountant)

"""The run's differential privacy as the model card and the compliance report state it.

The mode and each site's epsilon come from the DP events the ledger holds (the sites' events
with their updates, the coordinator's site-level events with its aggregates); the accountant
and delta are the run configuration's. Each epsilon is recomputed from those events, the same
computation as ``fedsilo privacy RUN``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from fedsilo.config import FedsiloConfig
from fedsilo.ledger import Entry, EntryKind
from fedsilo.privacy.accounting import AccountantName, compute_epsilon
from fedsilo.privacy.events import DpEvent, event_from_json
from fedsilo.report import Privacy

_NOT_RECORDED = "not recorded"


def _cumulative(
    events: Sequence[tuple[int, DpEvent]], *, delta: float, accountant: AccountantName
) -> tuple[tuple[int, float], ...]:
    """Epsilon after each round, composing every event up to and including that round."""
    points: list[tuple[int, float]] = []
    for round_number in sorted({r for r, _ in events}):
        upto = [event for r, event in events if r <= round_number]
        points.append((round_number, compute_epsilon(upto, delta=delta, accountant=accountant)))
    return tuple(points)


def _site_level_label(secure: str) -> str:
    return (
        "distributed site-level (each site noises its update before secure aggregation)"
        if secure != "none"
        else "site-level (the coordinator clips and noises each round's aggregate)"
    )


def privacy_of(entries: Sequence[Entry], config: FedsiloConfig | None) -> Privacy:
    """The run's DP settings and each site's DP mode and epsilon after each round, from the
    ledger (the accountant and delta are the run configuration's)."""
    secure = config.secure_aggregation.mode if config is not None else _NOT_RECORDED
    per_site: dict[str, list[tuple[int, DpEvent]]] = defaultdict(list)
    site_level: list[tuple[int, DpEvent]] = []
    accepted: set[str] = set()
    summed_under_site_level: set[str] = set()
    for entry in entries:
        round_number = entry.payload.get("round")
        if not isinstance(round_number, int):
            continue
        if entry.kind is EntryKind.UPDATE_RECEIVED:
            site = str(entry.payload.get("site_id"))
            accepted.add(site)
            raw = entry.payload.get("dp_event")
            if isinstance(raw, dict):
                per_site[site].append((round_number, event_from_json(raw)))
        elif entry.kind is EntryKind.ROUND_AGGREGATED:
            raw = entry.payload.get("site_dp_event")
            if isinstance(raw, dict):
                site_level.append((round_number, event_from_json(raw)))
                summed = entry.payload.get("sites")
                if isinstance(summed, list):
                    summed_under_site_level.update(str(s) for s in summed)
    site_modes = {}
    for site in sorted(accepted):
        modes = ["record-level DP-SGD"] if site in per_site else []
        if site in summed_under_site_level:
            modes.append(_site_level_label(secure))
        site_modes[site] = "; ".join(modes) or "none"
    if config is None or not (config.privacy.record_level or config.privacy.site_level):
        return Privacy(
            mode="none",
            accountant=None,
            delta=None,
            secure_aggregation=secure,
            site_modes=site_modes,
        )
    settings = config.privacy
    modes = []
    if settings.record_level:
        modes.append("record-level (DP-SGD at every site)")
    if settings.site_level:
        modes.append(_site_level_label(secure))
    delta, accountant = settings.delta, settings.accountant
    return Privacy(
        mode="; ".join(modes),
        accountant=accountant,
        delta=delta,
        secure_aggregation=secure,
        epsilon={
            site: _cumulative(events, delta=delta, accountant=accountant)
            for site, events in sorted(per_site.items())
        },
        site_level_epsilon=_cumulative(site_level, delta=delta, accountant=accountant),
        site_modes=site_modes,
    )

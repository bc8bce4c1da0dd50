"""The run's differential privacy as the model card and the compliance report state it.

The mode and each site's epsilon come from the DP events the ledger holds (the sites' events
with their updates, the coordinator's site-level events with its aggregates). The DP settings
(which layers, accountant, delta) and the secure-aggregation mode are the run configuration's,
read only from a ``config.toml`` whose digest is the one the ledger records, else from the
ledger's ``run_started`` entry where it records them; where neither establishes them the reader
is told so, and no epsilon is computed (it needs the accountant and delta). Each epsilon is
recomputed from those events, the same computation as ``fedsilo privacy RUN``; an event that
cannot be read is named, never skipped silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

from fedsilo.config import FedsiloConfig
from fedsilo.config.schema import SecureAggregationMode
from fedsilo.ledger import Entry, EntryKind
from fedsilo.ledger.entries import DP_SETTINGS_FIELD
from fedsilo.privacy.accounting import AccountantName, compute_epsilon
from fedsilo.privacy.events import DpEvent, event_from_json
from fedsilo.report import Privacy
from fedsilo.server.report_provenance import recorded_config
from fedsilo.server.site_disclosure import disclosure_of

_NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class DpSettings:
    """The run's DP layers, accountant and delta, and where they were read (``source``)."""

    record_level: bool
    site_level: bool
    accountant: AccountantName
    delta: float
    source: str


def _started(entries: Sequence[Entry]) -> Mapping[str, object]:
    return next((e.payload for e in entries if e.kind is EntryKind.RUN_STARTED), {})


def dp_settings(config: FedsiloConfig | None, entries: Sequence[Entry]) -> DpSettings | None:
    """The run's DP settings from ``config`` where the ledger's configuration digest covers it,
    else from the run_started entry's record of them; None where neither establishes them."""
    checked = recorded_config(config, entries)
    if checked is not None:
        privacy = checked.privacy
        return DpSettings(
            privacy.record_level,
            privacy.site_level,
            privacy.accountant,
            privacy.delta,
            "config.toml, whose digest is the one the ledger records",
        )
    recorded = _started(entries).get(DP_SETTINGS_FIELD)
    if not isinstance(recorded, dict):
        return None
    record_level, site_level = recorded.get("record_level"), recorded.get("site_level")
    accountant, delta = recorded.get("accountant"), recorded.get("delta")
    if (
        not isinstance(record_level, bool)
        or not isinstance(site_level, bool)
        or accountant not in get_args(AccountantName)
        or isinstance(delta, bool)
        or not isinstance(delta, int | float)
        or not 0 < delta < 1
    ):
        return None
    return DpSettings(
        record_level,
        site_level,
        "pld" if accountant == "pld" else "rdp",
        float(delta),
        "the ledger's run_started entry (config.toml is not the configuration the ledger records)",
    )


def secure_aggregation_of(config: FedsiloConfig | None, entries: Sequence[Entry]) -> str:
    """The secure-aggregation mode from a config.toml the ledger's digest covers, else as the
    run_started entry records it, else "not recorded"."""
    checked = recorded_config(config, entries)
    if checked is not None:
        return checked.secure_aggregation.mode
    recorded = _started(entries).get("secure_aggregation")
    known: tuple[SecureAggregationMode, ...] = get_args(SecureAggregationMode)
    return recorded if isinstance(recorded, str) and recorded in known else _NOT_RECORDED


@dataclass(frozen=True)
class _Events:
    """The DP events of a ledger, read entry by entry."""

    per_site: Mapping[str, list[tuple[int, DpEvent]]]
    site_level: list[tuple[int, DpEvent]]
    unreadable: list[str]
    record_level_held: bool  # any site's DP event, readable or not
    site_level_held: bool  # any site-level DP event, readable or not
    summed_under_site_level: set[str]
    accepted: set[str]

    @property
    def held(self) -> bool:
        """Whether the ledger holds any DP event at all."""
        return self.record_level_held or self.site_level_held


def _read_events(entries: Sequence[Entry]) -> _Events:
    per_site: dict[str, list[tuple[int, DpEvent]]] = defaultdict(list)
    site_level: list[tuple[int, DpEvent]] = []
    unreadable: list[str] = []
    held: set[EntryKind] = set()
    accepted: set[str] = set()
    summed_under_site_level: set[str] = set()
    for entry in entries:
        round_number = entry.payload.get("round")
        if not isinstance(round_number, int):
            continue
        if entry.kind is EntryKind.UPDATE_RECEIVED:
            site = str(entry.payload.get("site_id"))
            accepted.add(site)
            raw, owner = entry.payload.get("dp_event"), f"site {site!r}'s"
        elif entry.kind is EntryKind.ROUND_AGGREGATED:
            raw, owner = entry.payload.get("site_dp_event"), "the site-level"
            summed = entry.payload.get("sites")
            if raw is not None and isinstance(summed, list):
                summed_under_site_level.update(str(s) for s in summed)
        else:
            continue
        if raw is None:
            continue
        held.add(entry.kind)
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"a DP event must be a JSON object, got {type(raw).__name__}")
            event = event_from_json(raw)
        except (ValueError, TypeError) as error:
            unreadable.append(
                f"entry {entry.seq}: DP event unreadable ({owner} event of round "
                f"{round_number}: {error}); {owner} \u03b5 shown here leaves this event out, so "
                "it understates the privacy loss"
            )
            continue
        if entry.kind is EntryKind.UPDATE_RECEIVED:
            per_site[site].append((round_number, event))
        else:
            site_level.append((round_number, event))
    return _Events(
        per_site,
        site_level,
        unreadable,
        record_level_held=EntryKind.UPDATE_RECEIVED in held,
        site_level_held=EntryKind.ROUND_AGGREGATED in held,
        summed_under_site_level=summed_under_site_level,
        accepted=accepted,
    )


def _cumulative(
    events: Sequence[tuple[int, DpEvent]], *, delta: float, accountant: AccountantName
) -> tuple[tuple[int, float], ...]:
    """Epsilon after each round, composing every event up to and including that round.

    Raises ValueError (UnsupportedEventError included) where the events cannot be accounted.
    """
    points: list[tuple[int, float]] = []
    for round_number in sorted({r for r, _ in events}):
        upto = [event for r, event in events if r <= round_number]
        points.append((round_number, compute_epsilon(upto, delta=delta, accountant=accountant)))
    return tuple(points)


def _site_level_label(secure: str) -> str:
    if secure == "none":
        return "site-level (the coordinator clips and noises each round's aggregate)"
    if secure == _NOT_RECORDED:
        return (
            "site-level (the secure-aggregation mode is not recorded, so whether the "
            "coordinator or each site added the noise is not established)"
        )
    return "distributed site-level (each site noises its update before secure aggregation)"


def _mode(settings: DpSettings | None, events: _Events, secure: str) -> str:
    if settings is not None:
        modes = []
        if settings.record_level:
            modes.append("record-level (DP-SGD at every site)")
        if settings.site_level:
            modes.append(_site_level_label(secure))
        return "; ".join(modes) or "none"
    shown = []
    if events.record_level_held:
        shown.append("record-level DP-SGD")
    if events.site_level_held:
        shown.append(_site_level_label(secure))
    if not shown:
        return "not established (config.toml does not establish it; no DP event in the ledger)"
    return (
        f"{'; '.join(shown)}, as the ledger's DP events show (the run's DP settings are not "
        "established: config.toml is not the configuration the ledger records)"
    )


def _update_visibility(entries: Sequence[Entry]) -> str | None:
    trust = _started(entries).get("secure_aggregation_trust")
    return trust if isinstance(trust, str) and trust else None


def _he_tensors(secure: str, config: FedsiloConfig | None, entries: Sequence[Entry]) -> str | None:
    """Which tensors an HE run encrypted, in words; None for a run without HE."""
    if secure != "he":
        return None
    # What a site disclosed is decided once, for the model card and this report alike.
    disclosure = disclosure_of(config, _started(entries), entries)
    selected = disclosure.he_tensors if disclosure is not None else None
    if selected is None:
        return (
            "not established (the ledger does not record the selection, and config.toml is not "
            "the configuration it records): tensors not selected travelled in the clear"
        )
    if not selected:
        return "all of the adapter update"
    return (
        f"the tensors whose names contain {', '.join(selected)}; the others travelled to the "
        "coordinator site by site in the clear"
    )


def privacy_of(entries: Sequence[Entry], config: FedsiloConfig | None) -> Privacy:
    """The run's DP settings and each site's DP mode and epsilon after each round, from the
    ledger; the settings from ``config`` only where the ledger's configuration digest covers
    it (see :func:`dp_settings`)."""
    secure = secure_aggregation_of(config, entries)
    settings = dp_settings(config, entries)
    events = _read_events(entries)
    notes = list(events.unreadable)
    site_modes = {}
    for site in sorted(events.accepted):
        modes = ["record-level DP-SGD"] if site in events.per_site else []
        if site in events.summed_under_site_level:
            modes.append(_site_level_label(secure))
        site_modes[site] = "; ".join(modes) or "none"
    epsilon: dict[str, tuple[tuple[int, float], ...]] = {}
    site_level: tuple[tuple[int, float], ...] = ()
    private = settings is not None and (settings.record_level or settings.site_level)
    if settings is None:
        if events.held:
            notes.append(
                "\u03b5 is not computed: it needs the run's accountant and \u03b4, and neither "
                "config.toml (not the configuration the ledger records) nor the ledger "
                "establishes them"
            )
    elif not private:
        if events.held:
            notes.append(
                "the ledger holds DP events, but the run's settings name no DP layer; no "
                "\u03b5 is computed from them"
            )
    else:
        for site, history in sorted(events.per_site.items()):
            try:
                epsilon[site] = _cumulative(
                    history, delta=settings.delta, accountant=settings.accountant
                )
            except (ValueError, TypeError) as error:
                notes.append(f"site {site!r}: \u03b5 not computed: {error}")
        try:
            site_level = _cumulative(
                events.site_level, delta=settings.delta, accountant=settings.accountant
            )
        except (ValueError, TypeError) as error:
            notes.append(f"site-level \u03b5 not computed: {error}")
    return Privacy(
        mode=_mode(settings, events, secure),
        accountant=settings.accountant if settings and private else None,
        delta=settings.delta if settings and private else None,
        secure_aggregation=secure,
        update_visibility=_update_visibility(entries),
        he_tensors=_he_tensors(secure, config, entries),
        epsilon=epsilon,
        site_level_epsilon=site_level,
        site_modes=site_modes,
        settings_source=settings.source if settings else None,
        events_recorded=events.held,
        notes=tuple(notes),
    )

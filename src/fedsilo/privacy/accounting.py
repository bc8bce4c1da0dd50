"""Privacy accounting: epsilon as a pure function of stored DP events.

:func:`compute_epsilon` composes a history of events (one site's record-level history, or the
federation's site-level history) with one of dp-accounting's accountants and returns epsilon at
a given delta. It holds no state, so anyone with the events, delta, the accountant's name and the
pinned dp-accounting version recomputes the same number. :class:`SpendingRecord` only keeps a
site's history in order and asks these functions.

Composition recipe (what an auditor repeats): equal events are grouped in order of first
appearance, and ``ComposedDpEvent([SelfComposedDpEvent(to_dp_accounting(e), count), ...])`` is
composed once into a fresh ``RdpAccountant(neighboring_relation=r)`` (default orders) or
``PLDAccountant(neighboring_relation=r)`` (default discretisation 1e-4), ``r`` being the events'
common :func:`~fedsilo.privacy.events.neighboring_relation`; epsilon is its
``get_epsilon(delta)``. Composition does not depend on order, and grouping lets dp-accounting
compose a repeated round in one step (a history of 100 equal rounds costs about one round).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import dp_accounting
from dp_accounting import NeighboringRelation

from fedsilo.privacy.events import (
    DpEvent,
    PoissonGaussianEvent,
    SampledSitesGaussianEvent,
    neighboring_relation,
    to_dp_accounting,
)

AccountantName: TypeAlias = Literal["rdp", "pld"]
"""``"rdp"``: Renyi DP (dp-accounting's ``RdpAccountant``), supports every fedsilo event.
``"pld"``: privacy loss distributions (``PLDAccountant``), tighter, slower, and without support
for sampling sites without replacement."""

_ACCOUNTANTS: Final[
    Mapping[str, Callable[[NeighboringRelation], dp_accounting.PrivacyAccountant]]
] = {
    "rdp": lambda relation: dp_accounting.rdp.RdpAccountant(neighboring_relation=relation),
    "pld": lambda relation: dp_accounting.pld.PLDAccountant(neighboring_relation=relation),
}


class UnsupportedEventError(ValueError):
    """The events cannot be accounted as asked, so no epsilon is given rather than a wrong one.

    Raised when the chosen accountant does not support an event, or when the events do not share
    one unit and neighbouring relation (record-level and site-level events, or site-level events
    with and without sampling of sites, make no single guarantee together).
    """


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _new_accountant(
    accountant: AccountantName, relation: NeighboringRelation
) -> dp_accounting.PrivacyAccountant:
    factory = _ACCOUNTANTS.get(accountant)
    if factory is None:
        known = ", ".join(repr(name) for name in _ACCOUNTANTS)
        raise ValueError(f"accountant must be one of {known}, got {accountant!r}")
    return factory(relation)


def _common_relation(events: Sequence[DpEvent]) -> NeighboringRelation:
    """The relation all ``events`` are accounted under; ADD_OR_REMOVE_ONE when there are none."""
    if not events:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    for index, event in enumerate(events):
        if not isinstance(event, PoissonGaussianEvent | SampledSitesGaussianEvent):
            raise TypeError(
                f"events[{index}] is not a fedsilo DP event: {type(event).__name__} {event!r}"
            )
    first = events[0]
    relation = neighboring_relation(first)
    for index, event in enumerate(events):
        if type(event) is not type(first):
            raise UnsupportedEventError(
                f"events[{index}] is a {type(event).__name__} but events[0] is a "
                f"{type(first).__name__}: record-level and site-level events protect different "
                "units and cannot be composed into one epsilon"
            )
        if neighboring_relation(event) is not relation:
            raise UnsupportedEventError(
                f"events[{index}] ({event!r}) is accounted under "
                f"{neighboring_relation(event).name} but events[0] ({first!r}) under "
                f"{relation.name}: rounds with and without sampling of sites cannot be composed "
                "into one epsilon"
            )
    return relation


def _accountant_for(
    events: Sequence[DpEvent], accountant: AccountantName
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant for ``events``, after checking that it can account every one."""
    relation = _common_relation(events)
    privacy_accountant = _new_accountant(accountant, relation)
    for index, event in enumerate(events):
        if not privacy_accountant.supports(to_dp_accounting(event)):
            hint = ""
            if accountant != "rdp" and _new_accountant("rdp", relation).supports(
                to_dp_accounting(event)
            ):
                hint = "; the 'rdp' accountant supports it"
            raise UnsupportedEventError(
                f"events[{index}] ({event!r}) is not supported by the {accountant!r} accountant "
                f"under {relation.name}{hint}"
            )
    return privacy_accountant


def compute_epsilon(
    events: Sequence[DpEvent], *, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon at ``delta`` of all ``events`` composed (see the module docstring for the recipe).

    ``events`` is one history: a site's record-level events, or the federation's site-level
    events. With no events the result is 0.0, which is what both dp-accounting accountants
    return when nothing has been composed.

    Raises:
        ValueError: ``delta`` not in (0, 1), or an unknown ``accountant``.
        UnsupportedEventError: ``accountant`` cannot account an event (PLD and sampling of
            sites), or the events mix units or neighbouring relations.
        TypeError: an element of ``events`` is not a fedsilo DP event.
    """
    checked_delta = _check_delta(delta)
    privacy_accountant = _accountant_for(events, accountant)
    groups = Counter(events)
    privacy_accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(to_dp_accounting(event), count)
                for event, count in groups.items()
            ]
        )
    )
    return float(privacy_accountant.get_epsilon(checked_delta))


def epsilon_per_round(
    events: Sequence[DpEvent], *, delta: float, accountant: AccountantName = "rdp"
) -> list[float]:
    """Cumulative epsilon after each event, e.g. for a per-round curve in a report.

    Recipe: one accountant (as in :func:`compute_epsilon`) composes the events one at a time,
    in order, and epsilon is read after each. The cost is one composition per event, where
    calling :func:`compute_epsilon` on every prefix would grow with the square of the history.
    Entry ``i`` equals ``compute_epsilon(events[: i + 1])`` up to the rounding of composing
    the same events in another grouping (RDP: about 1e-15 relative; PLD: its discretisation,
    about 1e-9 relative); budgets are decided by :func:`compute_epsilon`.

    Raises:
        The same errors as :func:`compute_epsilon`, for the whole history before any work.
    """
    checked_delta = _check_delta(delta)
    privacy_accountant = _accountant_for(events, accountant)
    epsilons: list[float] = []
    for event in events:
        privacy_accountant.compose(to_dp_accounting(event))
        epsilons.append(float(privacy_accountant.get_epsilon(checked_delta)))
    return epsilons


@dataclass
class SpendingRecord:
    """A site's privacy spending: the DP events it has recorded, in order.

    The record only keeps history; every epsilon comes from :func:`compute_epsilon`. A site
    calls :meth:`epsilon_if` before a round and refuses the round if the total would exceed
    its budget, and :meth:`record` after the round ran.

    Raises:
        UnsupportedEventError: ``events`` mix units or neighbouring relations.
        TypeError: an element of ``events`` is not a fedsilo DP event.
    """

    events: tuple[DpEvent, ...] = ()

    def __post_init__(self) -> None:
        self.events = tuple(self.events)
        _common_relation(self.events)

    def record(self, event: DpEvent) -> None:
        """Append ``event`` (a mechanism that has run) to the history.

        Raises:
            UnsupportedEventError: ``event`` cannot be composed with the recorded events
                (another unit or neighbouring relation); nothing is recorded.
            TypeError: ``event`` is not a fedsilo DP event.
        """
        extended = (*self.events, event)
        _common_relation(extended)
        self.events = extended

    def epsilon(self, *, delta: float, accountant: AccountantName = "rdp") -> float:
        """Epsilon spent so far at ``delta``: ``compute_epsilon(self.events, ...)``."""
        return compute_epsilon(self.events, delta=delta, accountant=accountant)

    def epsilon_if(
        self, event: DpEvent, *, delta: float, accountant: AccountantName = "rdp"
    ) -> float:
        """Epsilon at ``delta`` if ``event`` were recorded next; the record is not changed."""
        return compute_epsilon((*self.events, event), delta=delta, accountant=accountant)

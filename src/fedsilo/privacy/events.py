"""DP events: what a differentially private mechanism did, as data that can be stored and replayed.

An event holds exactly the parameters that privacy accounting needs, and nothing about the data.
A site's events (or the federation's site-level events) are stored as JSON (:func:`event_to_json`,
:func:`event_from_json`); :mod:`fedsilo.privacy.accounting` turns any stored history back into an
epsilon, so an auditor recomputes every epsilon from the events alone.

Each event states its mathematical contract: the mechanism it stands for and the neighbouring
relation its guarantee is about. :func:`to_dp_accounting` gives the exact ``dp_accounting`` event
it stands for and :func:`neighboring_relation` the relation to account it under; the privacy
math itself is dp-accounting's.

JSON form: a flat object with a ``"type"`` tag and one key per field, e.g.
``{"type": "poisson_gaussian", "noise_multiplier": 1.1, "sampling_rate": 0.01, "steps": 50}``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import dp_accounting
from dp_accounting import NeighboringRelation


def _real(owner: str, name: str, value: object) -> float:
    # bool is an int subclass; True as a noise multiplier is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    return result


def _integer(owner: str, name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")
    return value


def _positive_noise(owner: str, value: object) -> float:
    noise = _real(owner, "noise_multiplier", value)
    if noise <= 0.0:
        raise ValueError(f"{owner}.noise_multiplier must be > 0, got {value!r}")
    return noise


@dataclass(frozen=True)
class PoissonGaussianEvent:
    """Record-level DP-SGD at one site for one round.

    Contract: ``steps`` steps; in each step every record of the site's dataset is included in
    the batch independently with probability ``sampling_rate``; each included record's gradient
    is clipped to L2 norm ``C``; the clipped gradients are summed and ``N(0, (noise_multiplier *
    C)^2 I)`` is added. Steps may be chosen adaptively from earlier outputs. Any ``C`` works:
    only the ratio ``noise_multiplier`` (noise standard deviation over clip norm) matters.

    Neighbouring relation: datasets that differ by adding or removing one record (one patient's
    record). The guarantee bounds how much one record changes the distribution of everything
    the site releases.

    Stands for ``SelfComposedDpEvent(PoissonSampledDpEvent(sampling_rate,
    GaussianDpEvent(noise_multiplier)), steps)`` under ``ADD_OR_REMOVE_ONE``.

    Raises:
        ValueError: ``noise_multiplier`` not finite and > 0, ``sampling_rate`` not in (0, 1], or
            ``steps`` not an integer >= 1 (the message names the field).
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "noise_multiplier", _positive_noise(owner, self.noise_multiplier))
        rate = _real(owner, "sampling_rate", self.sampling_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{owner}.sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        object.__setattr__(self, "sampling_rate", rate)
        _integer(owner, "steps", self.steps, minimum=1)


@dataclass(frozen=True)
class SampledSitesGaussianEvent:
    """Site-level DP on the coordinator's aggregate over ``rounds`` rounds.

    Contract: each round a uniformly random subset of exactly ``sites_per_round`` of the
    ``num_sites`` enrolled sites is drawn (sampling without replacement, fixed size, fresh each
    round); each chosen site's update is clipped to L2 norm ``S``; the clipped updates are summed
    and ``N(0, (noise_multiplier * S)^2 I)`` is added. Rounds may be adaptive. Only the ratio
    ``noise_multiplier`` (noise standard deviation over clip norm) matters.

    Neighbouring relation (the unit of privacy is one site's whole data):

    - ``sites_per_round == num_sites`` (every site every round, no amplification): adding or
      removing one site's whole data. The sum moves by at most ``S``, so a round is the Gaussian
      mechanism with noise multiplier ``noise_multiplier``; accounted as
      ``SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), rounds)`` under
      ``ADD_OR_REMOVE_ONE``.
    - ``sites_per_round < num_sites``: replacing one site's whole data by any other data (a site
      with no data included), with the roster of ``num_sites`` sites fixed and public, which is
      what fixed-size sampling needs and what dp-accounting analyses (``REPLACE_ONE``, RDP
      only). Replacing one site moves the sum by up to ``2 S``, so the Gaussian's multiplier
      relative to that sensitivity is ``noise_multiplier / 2``; accounted as
      ``SelfComposedDpEvent(SampledWithoutReplacementDpEvent(num_sites, sites_per_round,
      GaussianDpEvent(noise_multiplier / 2)), rounds)`` under ``REPLACE_ONE``. (dp-accounting's
      RDP analysis of this event reads the Gaussian's multiplier as noise over the L2
      sensitivity under that relation: at ``sites_per_round == num_sites`` it equals the plain
      Gaussian with that multiplier.)

    Both cases cover a site withdrawing all its data. The two relations differ, so one history
    cannot mix the two cases (:func:`fedsilo.privacy.accounting.compute_epsilon` refuses).

    Raises:
        ValueError: ``noise_multiplier`` not finite and > 0, ``num_sites`` < 1,
            ``sites_per_round`` not in [1, num_sites], or ``rounds`` < 1 (the message names the
            field).
    """

    noise_multiplier: float
    sites_per_round: int
    num_sites: int
    rounds: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "noise_multiplier", _positive_noise(owner, self.noise_multiplier))
        num_sites = _integer(owner, "num_sites", self.num_sites, minimum=1)
        per_round = _integer(owner, "sites_per_round", self.sites_per_round, minimum=1)
        if per_round > num_sites:
            raise ValueError(
                f"{owner}.sites_per_round must be <= num_sites ({num_sites}), got {per_round}"
            )
        _integer(owner, "rounds", self.rounds, minimum=1)

    @property
    def samples_sites(self) -> bool:
        """Whether rounds use a strict subset of the sites (privacy amplification by sampling)."""
        return self.sites_per_round < self.num_sites


DpEvent: TypeAlias = PoissonGaussianEvent | SampledSitesGaussianEvent
"""Any event fedsilo records."""

_EVENT_TYPES: Final[Mapping[str, type[DpEvent]]] = {
    "poisson_gaussian": PoissonGaussianEvent,
    "sampled_sites_gaussian": SampledSitesGaussianEvent,
}
_TYPE_TAGS: Final[Mapping[type[DpEvent], str]] = {cls: tag for tag, cls in _EVENT_TYPES.items()}


def _require_event(event: object) -> DpEvent:
    if not isinstance(event, PoissonGaussianEvent | SampledSitesGaussianEvent):
        raise TypeError(f"expected a fedsilo DP event, got {type(event).__name__}: {event!r}")
    return event


def event_to_json(event: DpEvent) -> dict[str, str | int | float]:
    """The event as a flat JSON object: ``{"type": tag, field: value, ...}``.

    Raises:
        TypeError: ``event`` is not a fedsilo DP event.
    """
    checked = _require_event(event)
    data: dict[str, str | int | float] = {"type": _TYPE_TAGS[type(checked)]}
    for field in dataclasses.fields(checked):
        data[field.name] = getattr(checked, field.name)
    return data


def event_from_json(data: Mapping[str, object]) -> DpEvent:
    """The event that :func:`event_to_json` wrote; strict, so a stored history is never guessed.

    An integer is accepted for a float field (some writers drop ``.0``); nothing else is coerced.

    Raises:
        ValueError: ``data`` is not an object, its ``"type"`` is missing or unknown, a field is
            missing or unknown, or a value is invalid (the message names the field).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"a DP event must be a JSON object, got {type(data).__name__}")
    tag = data.get("type")
    if not isinstance(tag, str) or tag not in _EVENT_TYPES:
        known = ", ".join(sorted(_EVENT_TYPES))
        raise ValueError(f"DP event has unknown or missing 'type' {tag!r} (known: {known})")
    cls = _EVENT_TYPES[tag]
    expected = {field.name for field in dataclasses.fields(cls)}
    given = set(data) - {"type"}
    if unknown := sorted(given - expected):
        raise ValueError(f"DP event of type {tag!r} has unknown field(s): {', '.join(unknown)}")
    if missing := sorted(expected - given):
        raise ValueError(f"DP event of type {tag!r} is missing field(s): {', '.join(missing)}")
    values: dict[str, Any] = {name: data[name] for name in expected}
    return cls(**values)


@functools.singledispatch
def to_dp_accounting(event: DpEvent) -> dp_accounting.DpEvent:
    """The exact ``dp_accounting`` event that ``event`` stands for (see each event's contract).

    Account it under :func:`neighboring_relation` of the same event.

    Raises:
        TypeError: ``event`` is not a fedsilo DP event.
    """
    raise TypeError(f"expected a fedsilo DP event, got {type(event).__name__}: {event!r}")


@to_dp_accounting.register
def _poisson_gaussian_event(event: PoissonGaussianEvent) -> dp_accounting.DpEvent:
    step = dp_accounting.PoissonSampledDpEvent(
        event.sampling_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, event.steps)


@to_dp_accounting.register
def _sampled_sites_event(event: SampledSitesGaussianEvent) -> dp_accounting.DpEvent:
    if not event.samples_sites:
        round_event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    else:
        # Replace-one sensitivity of a sum of S-clipped updates is 2 S (see the class docstring).
        round_event = dp_accounting.SampledWithoutReplacementDpEvent(
            event.num_sites,
            event.sites_per_round,
            dp_accounting.GaussianDpEvent(event.noise_multiplier / 2.0),
        )
    return dp_accounting.SelfComposedDpEvent(round_event, event.rounds)


@functools.singledispatch
def neighboring_relation(event: DpEvent) -> NeighboringRelation:
    """The neighbouring relation that ``event``'s guarantee is about (see each event's contract).

    Raises:
        TypeError: ``event`` is not a fedsilo DP event.
    """
    raise TypeError(f"expected a fedsilo DP event, got {type(event).__name__}: {event!r}")


@neighboring_relation.register
def _poisson_gaussian_relation(event: PoissonGaussianEvent) -> NeighboringRelation:
    return NeighboringRelation.ADD_OR_REMOVE_ONE


@neighboring_relation.register
def _sampled_sites_relation(event: SampledSitesGaussianEvent) -> NeighboringRelation:
    if event.samples_sites:
        return NeighboringRelation.REPLACE_ONE
    return NeighboringRelation.ADD_OR_REMOVE_ONE

"""The typed input of the compliance report: plain frozen records, filled from a run and its ledger.

The report renders exactly what these records hold and nothing else, so everything an auditor
sees can be traced to a field here. Strings in them (site names, rejection reasons) come from
parties outside the coordinator's control and are escaped by the renderer, never trusted.

Two verdicts are kept apart on purpose: whether the ledger verified (:class:`Verification`)
and how the run ended (:class:`Outcome`). A run can verify and still have failed; only a
verified, completed run is shown under a green banner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

KeySource = Literal["auditor", "folder"]
RunStatus = Literal["completed", "failed", "running", "unknown"]
ExecutionKind = Literal["simulation", "deployment", "central", "unknown"]


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying the ledger, and against which coordinator key.

    ``key_source`` is "auditor" when the auditor pinned the key (``--coordinator-key``) and
    "folder" when it was taken from the run folder itself, which proves only that the ledger
    matches the folder it came in, not who wrote it; ``site_key_source`` likewise for the site
    keys (``--site-keys``, or ``federation.json``). ``first_broken`` names the first broken
    entry (or "run folder") when verification failed. ``receipts`` is how many site receipts
    were examined (None: not recorded).
    """

    ok: bool
    summary: str
    problems: tuple[str, ...]
    first_broken: str | None
    key_source: KeySource
    coordinator_fingerprint: str
    entries: int
    site_key_source: KeySource = "folder"
    receipts: int | None = None

    def __post_init__(self) -> None:
        if self.ok and self.problems:
            raise ValueError(
                f"verification ok but {len(self.problems)} problem(s) listed; a verification "
                "with problems has not passed"
            )
        if not self.ok and not self.problems:
            raise ValueError("verification failed but no problem is listed")


@dataclass(frozen=True)
class Outcome:
    """How the run ended, from its status file and ledger; ``reason`` is one line or None."""

    status: RunStatus
    reason: str | None
    rounds_done: int
    rounds_planned: int | None


@dataclass(frozen=True)
class Fact:
    """One labelled value of the provenance list; ``mono`` values are digests or identifiers.

    ``note`` says what the value is of or where it comes from, shown after it.
    """

    label: str
    value: str
    mono: bool = False
    note: str | None = None


@dataclass(frozen=True)
class Execution:
    """How the run was executed, as its folder records it, and what that means for its claims.

    ``kind`` is "simulation" when every site ran on the coordinator's machine (fedsilo's
    in-process or Ray engine): the site signatures then attribute updates to simulated sites,
    they do not show that separate parties took part. "deployment" is a coordinator on Flower's
    SuperLink with each site on its own SuperNode; "central" a step no site takes part in (a
    distillation); "unknown" when the folder does not establish which. ``summary`` is one line;
    ``caveats`` are what a reader must know before relying on the rest of the report (none for
    a deployment whose folder holds no site key).
    """

    kind: ExecutionKind
    summary: str
    caveats: tuple[str, ...] = ()


UNKNOWN_EXECUTION = Execution(
    "unknown",
    "not recorded whether the run was simulated on one machine or deployed",
    (
        "The run folder does not establish whether the sites were separate parties, so this "
        "report makes no claim that records stayed at their sites.",
    ),
)


@dataclass(frozen=True)
class DeclaredPolicy:
    """A policy a site declared with its accepted updates, as the ledger records it.

    ``policy_sha256`` is the digest of the site's canonical policy, None where the site declared
    that it trains without one; ``rounds`` are the rounds of the updates it came with.
    """

    policy_sha256: str | None
    min_cohort: int
    rounds: tuple[int, ...]


@dataclass(frozen=True)
class SiteRow:
    """One site: its key fingerprint, its update counts and the policies it declared.

    ``undeclared`` counts its accepted updates whose ledger entry holds no readable policy
    declaration (ledgers written before sites declared one).
    """

    name: str
    fingerprint: str
    accepted: int
    rejected: int
    policies: tuple[DeclaredPolicy, ...] = ()
    undeclared: int = 0

    def __post_init__(self) -> None:
        if self.accepted < 0 or self.rejected < 0 or self.undeclared < 0:
            raise ValueError(
                f"site {self.name!r}: accepted ({self.accepted}), rejected ({self.rejected}) "
                f"and undeclared ({self.undeclared}) update counts must not be negative"
            )


@dataclass(frozen=True)
class UpdateRow:
    """One update (or refusal) of a site in one round, and what the coordinator did with it.

    ``detail`` is the payload digest when the update was accepted and a one-line reason when
    it was not; ``size_bytes`` is the payload size when known. ``node`` is the Flower node a
    rejection was recorded under when the site name was attributed from the ledger's signed
    updates of that node.
    """

    round: int
    site: str
    accepted: bool
    detail: str
    size_bytes: int | None
    node: str | None = None

    def __post_init__(self) -> None:
        if self.size_bytes is not None and self.size_bytes < 0:
            raise ValueError(
                f"update of site {self.site!r} in round {self.round}: "
                f"size_bytes must not be negative, got {self.size_bytes}"
            )


def is_point_interval(interval: tuple[float, float] | None) -> bool:
    """True for a zero-width interval: the bootstrap's at 0 of N (or N of N) right, where it
    understates the uncertainty."""
    return interval is not None and interval[0] == interval[1]


@dataclass(frozen=True)
class RoundRow:
    """The outcome of one round (round 0 is the base model before training).

    Accuracies are fractions in [0, 1] of ``gold_count`` gold examples; ``train_loss`` is
    None where no site trained (round 0). ``summed_sites`` are the sites whose updates the
    ledger records as aggregated; ``examples`` is the sum of their training-set sizes, only
    where every one of them sent its own. Otherwise ``examples_withheld`` says why there is none
    (record-level DP, secure aggregation). ``adapter_sha256`` is the aggregate the ledger
    records, None when the ledger has none for this round, in which case the row's metrics are
    not covered by the ledger; ``metrics_ledgered`` is True only when the round's ledger entry
    holds the digest of its metrics record (what ``fedsilo audit verify`` checks them against).
    """

    round: int
    sites_ok: int | None  # None where the record holds no count
    sites_failed: int | None
    summed_sites: tuple[str, ...]
    examples: int | None
    train_loss: float | None
    # None on a round after which the gold set was not scored ([evaluation] every_rounds).
    gold_accuracy: float | None
    gold_category_accuracy: float | None
    gold_loss: float | None
    gold_count: int | None
    adapter_sha256: str | None
    category_ci95: tuple[float, float] | None = None
    examples_withheld: str | None = None
    metrics_ledgered: bool = False

    @property
    def category_interval_is_point(self) -> bool:
        """The secondary score's interval is a single point (see :func:`is_point_interval`)."""
        return is_point_interval(self.category_ci95)

    def __post_init__(self) -> None:
        if self.examples is not None and self.examples_withheld is not None:
            raise ValueError(
                f"round {self.round}: an example count ({self.examples}) and a reason it is "
                f"withheld ({self.examples_withheld!r}) exclude each other"
            )
        for name in ("gold_accuracy", "gold_category_accuracy", "gold_loss"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"round {self.round}: {name} is not finite ({value!r})")
        if self.train_loss is not None and not math.isfinite(self.train_loss):
            raise ValueError(f"round {self.round}: train_loss is not finite ({self.train_loss!r})")


@dataclass(frozen=True)
class PartRow:
    """One figure of one gold-set part after the last round (``metrics.jsonl`` gold_parts).

    A ranking figure (top-k) has ``candidates``, the most candidates any of its records was
    ranked among, and ``chance``, what ranking at random gives for a record with that many.
    """

    part: str
    figure: str
    value: float
    ci95: tuple[float, float] | None
    count: int | None
    candidates: int | None = None
    chance: float | None = None

    @property
    def interval_is_point(self) -> bool:
        """The figure's interval is a single point (see :func:`is_point_interval`)."""
        return is_point_interval(self.ci95)


@dataclass(frozen=True)
class Privacy:
    """What bounds what the released adapter reveals about each site's records.

    ``mode`` is a reader-facing name ("none", "record-level DP-SGD", "site-level DP", ...).
    ``epsilon`` maps each site to ``((round, epsilon after that round), ...)`` recomputed from
    the ledger's DP events; ``site_level_epsilon`` likewise for site-level DP. ``site_modes``
    names, per site, the DP its ledgered updates show it ran under (its DP events, and the
    site-level events of the rounds that summed it). ``settings_source`` says where the mode,
    accountant and delta were read (None: not established); ``events_recorded`` whether the
    ledger holds any DP event (readable or not); ``notes`` what a reader must know about the
    epsilons (an event that could not be read, an epsilon that could not be computed).
    ``update_visibility`` is who could see one site's update, as the run_started entry states
    it (None: not recorded); ``he_tensors`` which tensors HE encrypted, in words (None: not
    an HE run).
    """

    mode: str
    accountant: str | None
    delta: float | None
    secure_aggregation: str
    update_visibility: str | None = None
    he_tensors: str | None = None
    epsilon: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    site_level_epsilon: tuple[tuple[int, float], ...] = ()
    site_modes: Mapping[str, str] = field(default_factory=dict)
    settings_source: str | None = None
    events_recorded: bool = False
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", MappingProxyType(dict(self.epsilon)))
        object.__setattr__(self, "site_modes", MappingProxyType(dict(self.site_modes)))
        if self.epsilon or self.site_level_epsilon:
            # An epsilon is computed from DP events: the ledger holds some.
            object.__setattr__(self, "events_recorded", True)

    @property
    def final_epsilon(self) -> dict[str, float]:
        """Each site's epsilon after its last round with a DP event."""
        return {site: max(points)[1] for site, points in self.epsilon.items() if points}


@dataclass(frozen=True)
class ReportData:
    """Everything the compliance report shows about one run folder.

    ``trained_in`` lists, for a run whose own ledger records no training on site records (a
    clustered run, a distillation), the expert runs that did: their reports state what bounds
    the sites' records. ``examples_note`` says what the rounds' example counts are (or why
    they are withheld);
    ``interval_note`` how the gold intervals were computed, and ``interval_caveats`` where
    such an interval understates the uncertainty (shown only where one does).
    """

    run_name: str
    run_kind: str
    generated_at: str
    verification: Verification
    outcome: Outcome
    facts: tuple[Fact, ...]
    privacy: Privacy
    sites: tuple[SiteRow, ...]
    rounds: tuple[RoundRow, ...]
    updates: tuple[UpdateRow, ...]
    metric: str
    metric_note: str
    secondary: str = "category accuracy"  # what gold_category_accuracy holds under the metric
    gold_parts: tuple[PartRow, ...] = ()
    notes: tuple[str, ...] = ()
    trained_in: tuple[str, ...] = ()
    execution: Execution = UNKNOWN_EXECUTION
    examples_note: str | None = None
    interval_note: str | None = None
    interval_caveats: tuple[str, ...] = ()

    @property
    def banner(self) -> Literal["pass", "warn", "fail"]:
        """Green only for a verified, completed run; red for a failed verification or run."""
        if not self.verification.ok or self.outcome.status == "failed":
            return "fail"
        if self.outcome.status == "completed":
            return "pass"
        return "warn"

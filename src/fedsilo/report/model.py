"""The typed input of the compliance report: plain frozen records, filled from a run and its ledger.

The report renders exactly what these records hold and nothing else, so everything an auditor
sees can be traced to a field here. Strings in them (site names, rejection reasons) come from
parties outside the coordinator's control and are escaped by the renderer, never trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class SiteRow:
    """One site of the federation: its name, its key fingerprint, and its update counts."""

    name: str
    fingerprint: str
    accepted: int
    rejected: int

    def __post_init__(self) -> None:
        if self.accepted < 0 or self.rejected < 0:
            raise ValueError(
                f"site {self.name!r}: accepted ({self.accepted}) and rejected ({self.rejected}) "
                "update counts must not be negative"
            )


@dataclass(frozen=True)
class UpdateRow:
    """One update a site sent in one round, and what the coordinator did with it.

    ``detail`` is the payload digest when the update was accepted and the rejection reason when
    it was not; ``size_bytes`` is the payload size when known.
    """

    round: int
    site: str
    accepted: bool
    detail: str
    size_bytes: int | None

    def __post_init__(self) -> None:
        if self.size_bytes is not None and self.size_bytes < 0:
            raise ValueError(
                f"update of site {self.site!r} in round {self.round}: "
                f"size_bytes must not be negative, got {self.size_bytes}"
            )


@dataclass(frozen=True)
class RoundRow:
    """The outcome of one round (round 0 is the base model before training).

    Accuracies are fractions in [0, 1]; ``train_loss`` is None where no site trained (round 0).
    """

    round: int
    sites_ok: int
    sites_failed: int
    train_loss: float | None
    gold_accuracy: float
    gold_category_accuracy: float
    gold_loss: float
    adapter_sha256: str


@dataclass(frozen=True)
class ReportData:
    """Everything the compliance report shows about one federated run.

    ``epsilon`` maps each site to its cumulative privacy loss after each round,
    ``((round, epsilon), ...)``; it is empty when no differential privacy was configured, and
    ``delta`` is then usually None. ``verify_ok`` is the outcome of verifying the run's ledger:
    a passing verification cannot list problems, since a PASS banner above a list of problems
    would tell the reader two different things.
    """

    run_name: str
    federation_id: str
    generated_at: str
    base_model_hash: str
    config_digest: str
    coordinator_fingerprint: str
    strategy: str
    privacy_summary: str
    verify_ok: bool
    verify_summary: str
    verify_problems: tuple[str, ...]
    sites: tuple[SiteRow, ...]
    rounds: tuple[RoundRow, ...]
    updates: tuple[UpdateRow, ...]
    epsilon: Mapping[str, tuple[tuple[int, float], ...]]
    delta: float | None

    def __post_init__(self) -> None:
        if self.verify_ok and self.verify_problems:
            raise ValueError(
                f"verify_ok is True but verify_problems lists {len(self.verify_problems)} "
                "problem(s); a verification with problems has not passed"
            )
        # A frozen record should not change under the renderer: keep a read-only copy.
        object.__setattr__(self, "epsilon", MappingProxyType(dict(self.epsilon)))

"""The site-level epsilon table in docs/privacy.md is what the accountant computes."""

import re
from pathlib import Path

import pytest

from fedsilo.privacy.accounting import compute_epsilon
from fedsilo.privacy.events import SampledSitesGaussianEvent

DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"
ROW = re.compile(r"^\| ([\d.]+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$")


def _rows() -> list[tuple[float, int, int, int, float]]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- site-level-epsilon-table -->")[1].split("<!-- end-")[0]
    rows = [m.groups() for line in table.splitlines() if (m := ROW.match(line.strip()))]
    return [(float(z), int(k), int(n), int(r), float(e)) for z, k, n, r, e in rows]


def test_the_table_has_rows_with_and_without_sampling() -> None:
    rows = _rows()

    assert any(k < n for _, k, n, _, _ in rows)
    assert any(k == n for _, k, n, _, _ in rows)


@pytest.mark.parametrize(("z", "per_round", "sites", "rounds", "epsilon"), _rows())
def test_each_documented_epsilon_is_recomputed(
    z: float, per_round: int, sites: int, rounds: int, epsilon: float
) -> None:
    event = SampledSitesGaussianEvent(
        noise_multiplier=z, sites_per_round=per_round, num_sites=sites, rounds=1
    )

    computed = compute_epsilon([event] * rounds, delta=1e-5)

    assert round(computed, 2) == pytest.approx(epsilon, abs=0.006)

"""The p-value that turns canary exposures into a test of memorisation."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from fedsilo.privacy.attacks import exposure_p_value


def test_one_canary_p_value_is_its_rank_over_the_candidates_plus_one() -> None:
    # Rank 3 among 199 candidates + the true secret: exposure log2(200) - log2(3).
    exposure = math.log2(200) - math.log2(3)

    assert exposure_p_value([exposure]) == pytest.approx(3 / 200)


def test_zero_exposure_is_no_evidence() -> None:
    assert exposure_p_value([0.0, 0.0, 0.0]) == 1.0


def test_two_canaries_by_hand() -> None:
    # s = ln2 * (1 + 2) = 3 ln 2; P(Gamma(2,1) >= s) = e^-s (1 + s) = (1 + 3 ln 2) / 8.
    assert exposure_p_value([1.0, 2.0]) == pytest.approx((1 + 3 * math.log(2)) / 8)


@given(
    st.lists(st.floats(min_value=0.0, max_value=12.0), min_size=1, max_size=30),
)
def test_matches_scipy_gamma_survival_function(exposures: list[float]) -> None:
    expected = stats.gamma.sf(math.log(2) * sum(exposures), a=len(exposures))

    assert exposure_p_value(exposures) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_uniform_ranks_give_uniform_p_values() -> None:
    # Under the null hypothesis (ranks uniform), P(p <= 0.05) must not exceed 0.05.
    rng = np.random.default_rng(0)
    candidates = 200
    ranks = rng.integers(1, candidates + 2, size=(20_000, 4))
    exposures = np.log2(candidates + 1) - np.log2(ranks)
    p_values = np.array([exposure_p_value(list(row)) for row in exposures])

    assert np.mean(p_values <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 20_000)


@pytest.mark.parametrize("bad", [[], [-0.1], [math.nan], [math.inf]])
def test_refuses_empty_negative_or_non_finite_exposures(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="exposure"):
        exposure_p_value(bad)

"""The percentile-bootstrap interval of gold-set figures."""

from __future__ import annotations

import math

import pytest

from fedsilo.evaluation.bootstrap import bootstrap_ci, exact_bounds_at_zero


def test_interval_brackets_the_mean_and_matches_the_binomial_width() -> None:
    hits = [1.0] * 60 + [0.0] * 140  # 30% of 200 records

    low, high = bootstrap_ci(hits, seed=3)

    assert low < 0.3 < high
    # The normal approximation of a binomial proportion: 0.3 +- 1.96 * sqrt(0.3 * 0.7 / 200).
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / 200)
    assert high - low == pytest.approx(2 * half_width, rel=0.15)


def test_same_seed_same_interval_other_seed_other_draw() -> None:
    hits = [float(i % 3 == 0) for i in range(50)]

    assert bootstrap_ci(hits, seed=1) == bootstrap_ci(hits, seed=1)
    assert bootstrap_ci(hits, seed=1) != bootstrap_ci(hits, seed=2)


def test_unanimous_records_give_a_point() -> None:
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert bootstrap_ci([0.0]) == (0.0, 0.0)


def test_exact_bounds_at_zero_of_200_known_answer() -> None:
    # scipy.stats.beta.ppf(0.95, 1, 200) and beta.ppf(0.975, 1, 200): the one-sided bound and
    # the Clopper-Pearson upper end for 0 successes in 200.
    one_sided, clopper_pearson = exact_bounds_at_zero(200)

    assert one_sided == pytest.approx(0.014867039231272054, rel=1e-12)
    assert clopper_pearson == pytest.approx(0.01827534035513624, rel=1e-12)


def test_exact_bounds_are_where_no_success_has_the_missing_probability() -> None:
    one_sided, two_sided = exact_bounds_at_zero(37, level=0.9)

    assert (1 - one_sided) ** 37 == pytest.approx(0.1)
    assert (1 - two_sided) ** 37 == pytest.approx(0.05)


def test_exact_bounds_refuse_an_empty_set() -> None:
    with pytest.raises(ValueError, match="count"):
        exact_bounds_at_zero(0)


def test_weights_pool_the_records() -> None:
    # Record 0: 9 of 10 tokens right; record 1: 0 of 90. Pooled: 9 / 100 = 0.09.
    values, weights = [0.9, 0.0], [10.0, 90.0]

    low, high = bootstrap_ci(values, weights=weights, resamples=2000)

    assert low == pytest.approx(0.0)
    assert high == pytest.approx(0.9)


def test_more_records_narrow_the_interval() -> None:
    small = bootstrap_ci([1.0, 0.0] * 10)
    large = bootstrap_ci([1.0, 0.0] * 200)

    assert large[1] - large[0] < (small[1] - small[0]) / 3


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([1.0, 0.0], {"weights": [1.0]}, "weights"),
        ([1.0, math.nan], {}, "finite"),
        ([1.0, 0.0], {"weights": [0.0, 0.0]}, "not all zero"),
        ([1.0, 0.0], {"weights": [-1.0, 2.0]}, "non-negative"),
        ([1.0], {"level": 1.0}, "level"),
        ([1.0], {"resamples": 0}, "resamples"),
    ],
)
def test_bad_input_is_refused(values: list[float], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)  # type: ignore[arg-type]

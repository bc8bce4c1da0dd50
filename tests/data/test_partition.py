"""Partitioners: every index once, deterministic per seed, and the skew each one promises."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.data.partition import partition_by_group, partition_dirichlet

LABELS = st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=200)
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _flatten(sites: list[list[int]]) -> list[int]:
    return sorted(index for site in sites for index in site)


def _mean_max_label_share(labels: list[str], sites: list[list[int]]) -> float:
    """Average over non-empty sites of the fraction of the site's items in its top label."""
    shares = [
        Counter(labels[i] for i in site).most_common(1)[0][1] / len(site) for site in sites if site
    ]
    return sum(shares) / len(shares)


@given(groups=LABELS, num_sites=st.integers(1, 8), seed=SEEDS)
def test_by_group_assigns_every_index_exactly_once(
    groups: list[str], num_sites: int, seed: int
) -> None:
    num_sites = min(num_sites, len(set(groups)))

    sites = partition_by_group(groups, num_sites=num_sites, rng=np.random.default_rng(seed))

    assert _flatten(sites) == list(range(len(groups)))


@given(groups=LABELS, num_sites=st.integers(1, 8), seed=SEEDS)
def test_by_group_sites_have_disjoint_groups(groups: list[str], num_sites: int, seed: int) -> None:
    num_sites = min(num_sites, len(set(groups)))

    sites = partition_by_group(groups, num_sites=num_sites, rng=np.random.default_rng(seed))

    site_groups = [{groups[i] for i in site} for site in sites]
    for a in range(num_sites):
        for b in range(a + 1, num_sites):
            assert not site_groups[a] & site_groups[b]


@given(groups=LABELS, num_sites=st.integers(1, 8), seed=SEEDS)
def test_by_group_deals_groups_evenly(groups: list[str], num_sites: int, seed: int) -> None:
    num_sites = min(num_sites, len(set(groups)))

    sites = partition_by_group(groups, num_sites=num_sites, rng=np.random.default_rng(seed))

    counts = [len({groups[i] for i in site}) for site in sites]
    assert max(counts) - min(counts) <= 1
    assert min(counts) >= 1


@given(groups=LABELS, num_sites=st.integers(1, 8), seed=SEEDS)
def test_by_group_is_deterministic_and_sorted(groups: list[str], num_sites: int, seed: int) -> None:
    num_sites = min(num_sites, len(set(groups)))

    first = partition_by_group(groups, num_sites=num_sites, rng=np.random.default_rng(seed))
    second = partition_by_group(groups, num_sites=num_sites, rng=np.random.default_rng(seed))

    assert first == second
    assert all(site == sorted(site) for site in first)


def test_by_group_depends_on_seed() -> None:
    groups = [str(g) for g in range(20)]

    splits = {
        tuple(map(tuple, partition_by_group(groups, num_sites=4, rng=np.random.default_rng(s))))
        for s in range(5)
    }

    assert len(splits) > 1


def test_by_group_rejects_more_sites_than_groups() -> None:
    with pytest.raises(ValueError, match="only 2 distinct"):
        partition_by_group(["a", "b", "a"], num_sites=3, rng=np.random.default_rng(0))


def test_by_group_rejects_zero_sites() -> None:
    with pytest.raises(ValueError, match="num_sites"):
        partition_by_group(["a"], num_sites=0, rng=np.random.default_rng(0))


@given(
    labels=LABELS,
    num_sites=st.integers(1, 6),
    alpha=st.floats(0.05, 100.0),
    seed=SEEDS,
)
def test_dirichlet_assigns_every_index_exactly_once(
    labels: list[str], num_sites: int, alpha: float, seed: int
) -> None:
    sites = partition_dirichlet(
        labels, num_sites=num_sites, alpha=alpha, rng=np.random.default_rng(seed), min_per_site=0
    )

    assert len(sites) == num_sites
    assert _flatten(sites) == list(range(len(labels)))


@given(
    labels=st.lists(st.sampled_from("abcd"), min_size=60, max_size=200),
    num_sites=st.integers(1, 4),
    alpha=st.floats(0.5, 100.0),
    seed=SEEDS,
)
@settings(max_examples=50)
def test_dirichlet_gives_every_site_min_per_site(
    labels: list[str], num_sites: int, alpha: float, seed: int
) -> None:
    sites = partition_dirichlet(
        labels, num_sites=num_sites, alpha=alpha, rng=np.random.default_rng(seed), min_per_site=3
    )

    assert min(len(site) for site in sites) >= 3


@given(labels=LABELS, num_sites=st.integers(1, 6), alpha=st.floats(0.05, 100.0), seed=SEEDS)
def test_dirichlet_is_deterministic_and_sorted(
    labels: list[str], num_sites: int, alpha: float, seed: int
) -> None:
    def split() -> list[list[int]]:
        return partition_dirichlet(
            labels,
            num_sites=num_sites,
            alpha=alpha,
            rng=np.random.default_rng(seed),
            min_per_site=0,
        )

    first, second = split(), split()

    assert first == second
    assert all(site == sorted(site) for site in first)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = [label for label in "abcdefgh" for _ in range(50)]
    alphas = [0.05, 0.5, 5.0, 500.0]

    skew = [
        np.mean(
            [
                _mean_max_label_share(
                    labels,
                    partition_dirichlet(
                        labels, num_sites=4, alpha=alpha, rng=np.random.default_rng(seed)
                    ),
                )
                for seed in range(20)
            ]
        )
        for alpha in alphas
    ]

    assert skew == sorted(skew, reverse=True)
    # 8 labels over 4 sites: at alpha 0.05 each label lands on about one site, so a site holds
    # about 2 labels (share ~1/2); at alpha 500 every site has the global mix (share ~1/8).
    assert skew[0] > 0.45
    assert skew[-1] < 0.15


def test_dirichlet_rejects_nonpositive_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(["a"], num_sites=1, alpha=0.0, rng=np.random.default_rng(0))


def test_dirichlet_rejects_zero_sites() -> None:
    with pytest.raises(ValueError, match="num_sites"):
        partition_dirichlet(["a"], num_sites=0, alpha=1.0, rng=np.random.default_rng(0))


def test_dirichlet_rejects_too_few_items_for_min_per_site() -> None:
    with pytest.raises(ValueError, match="only 3 item"):
        partition_dirichlet(
            ["a", "b", "c"], num_sites=2, alpha=1.0, rng=np.random.default_rng(0), min_per_site=2
        )


def test_dirichlet_gives_up_after_bounded_attempts() -> None:
    # One label and a tiny alpha put nearly everything on one site, every time.
    labels = ["a"] * 10

    with pytest.raises(ValueError, match="attempts"):
        partition_dirichlet(
            labels, num_sites=2, alpha=1e-3, rng=np.random.default_rng(0), min_per_site=5
        )

"""Split a dataset's indices across sites, to simulate non-IID federations.

Both partitioners are pure functions of their arguments: all randomness comes from the
``numpy.random.Generator`` passed in, so a seed reproduces a split exactly. Each returns one
sorted list of indices per site, and every index of the input appears in exactly one list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Resampling a Dirichlet split until every site has enough data terminates quickly for sane
# settings; a hard bound turns impossible or near-impossible settings into a clear error.
MAX_DIRICHLET_ATTEMPTS = 100


def _check_num_sites(num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")


def partition_by_group(
    groups: Sequence[str], *, num_sites: int, rng: np.random.Generator
) -> list[list[int]]:
    """Give each site whole groups, so no group is shared between sites.

    ``groups[i]`` is the group of item ``i`` (for example a hospital specialty). The distinct
    groups are shuffled with ``rng`` and dealt to the sites round-robin, so each site gets
    ``len(distinct groups) // num_sites`` groups or one more, and the sites' group sets are
    disjoint. Raises ``ValueError`` if there are fewer distinct groups than sites, since some
    site would then get nothing.
    """
    _check_num_sites(num_sites)
    # Sorted first, so the split depends on the seed and the set of groups, not on which
    # group happens to come first in the input.
    distinct = sorted(set(groups))
    if len(distinct) < num_sites:
        raise ValueError(
            f"cannot give {num_sites} sites whole groups: only {len(distinct)} distinct "
            f"group(s) {distinct}"
        )
    order = rng.permutation(len(distinct))
    site_of_group = {distinct[g]: position % num_sites for position, g in enumerate(order)}
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    for index, group in enumerate(groups):
        sites[site_of_group[group]].append(index)
    return sites


def _dirichlet_split(
    labels: Sequence[str], *, num_sites: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    for label in sorted(by_label):
        indices = np.asarray(by_label[label])
        rng.shuffle(indices)
        shares = rng.dirichlet(np.full(num_sites, alpha))
        # Cut points from the cumulative shares: site s gets the slice between cut s-1 and s.
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for site, part in enumerate(np.split(indices, cuts)):
            sites[site].extend(int(i) for i in part)
    return [sorted(site) for site in sites]


def partition_dirichlet(
    labels: Sequence[str],
    *,
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_per_site: int = 1,
) -> list[list[int]]:
    """Label-skewed split: for each label, the sites' shares are drawn from Dir(alpha).

    This is the usual non-IID benchmark split (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution"): a small ``alpha`` (0.1) gives each site a few dominant
    labels, a large ``alpha`` (100) gives every site nearly the global label mix. If some site
    ends up with fewer than ``min_per_site`` items the whole split is drawn again, up to
    ``MAX_DIRICHLET_ATTEMPTS`` times, then ``ValueError`` is raised.
    """
    _check_num_sites(num_sites)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_per_site < 0:
        raise ValueError(f"min_per_site must be >= 0, got {min_per_site}")
    if len(labels) < num_sites * min_per_site:
        raise ValueError(
            f"cannot give each of {num_sites} sites at least {min_per_site} item(s): "
            f"only {len(labels)} item(s)"
        )
    smallest = 0
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        sites = _dirichlet_split(labels, num_sites=num_sites, alpha=alpha, rng=rng)
        smallest = min(len(site) for site in sites)
        if smallest >= min_per_site:
            return sites
    raise ValueError(
        f"no Dirichlet split with alpha={alpha} gave all {num_sites} sites at least "
        f"{min_per_site} item(s) in {MAX_DIRICHLET_ATTEMPTS} attempts (the last gave one site "
        f"{smallest}); raise alpha, or lower num_sites or min_per_site"
    )

"""Grouping sites into clusters by the direction of their updates: pure functions, deterministic.

Each site's first-round update is flattened into one vector (tensors in sorted name order);
two sites are as alike as the cosine of their vectors. Sites are then merged bottom-up with
average linkage (the similarity of two clusters is the mean similarity of their members'
pairs) until ``count`` clusters remain. Ties are broken by the clusters' sorted member names,
so the same similarities always give the same clusters, whatever order the sites came in; an
auditor recomputes the assignment from the similarities stored in the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsilo.model.adapters import AdapterState

Similarities = dict[str, dict[str, float]]


def _flat(update: AdapterState) -> torch.Tensor:
    return torch.cat([update[name].reshape(-1).to(torch.float64) for name in sorted(update)])


def cosine_similarities(updates: Mapping[str, AdapterState]) -> Similarities:
    """Cosine similarity of every pair of sites' updates (1.0 on the diagonal).

    Raises ValueError if updates differ in tensor names or shapes, or one is all zeros (its
    direction is undefined).
    """
    names = sorted(updates)
    vectors: dict[str, torch.Tensor] = {}
    reference = None
    for name in names:
        shapes = {key: tuple(tensor.shape) for key, tensor in sorted(updates[name].items())}
        if reference is None:
            reference = shapes
        elif shapes != reference:
            raise ValueError(f"the update of site {name!r} has other tensors than the others")
        vector = _flat(updates[name])
        norm = torch.linalg.vector_norm(vector)
        if not bool(norm > 0):
            raise ValueError(f"the update of site {name!r} is zero: it has no direction")
        vectors[name] = vector / norm
    return {
        a: {b: 1.0 if a == b else float(torch.dot(vectors[a], vectors[b])) for b in names}
        for a in names
    }


def _linkage(
    similarity: Mapping[str, Mapping[str, float]], a: Sequence[str], b: Sequence[str]
) -> float:
    return sum(similarity[x][y] for x in a for y in b) / (len(a) * len(b))


def agglomerate(similarity: Mapping[str, Mapping[str, float]], *, count: int) -> list[list[str]]:
    """Average-linkage clusters of the sites in ``similarity``, ``count`` of them.

    Returns the clusters with their sites sorted, ordered by their first site. ValueError if
    ``count`` is not between 1 and the number of sites, or the matrix is not square.
    """
    names = sorted(similarity)
    if any(sorted(row) != names for row in similarity.values()):
        raise ValueError("the similarity matrix must have a row and a column for every site")
    if not 1 <= count <= len(names):
        raise ValueError(f"cannot make {count} clusters of {len(names)} sites")
    clusters: list[list[str]] = [[name] for name in names]
    while len(clusters) > count:
        best: tuple[float, tuple[str, ...], tuple[str, ...]] | None = None
        best_pair = (0, 1)
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                score = _linkage(similarity, clusters[i], clusters[j])
                # Highest similarity wins; on a tie, the pair whose names sort first.
                key = (-score, tuple(clusters[i]), tuple(clusters[j]))
                if best is None or key < best:
                    best, best_pair = key, (i, j)
        i, j = best_pair
        merged = sorted([*clusters[i], *clusters[j]])
        clusters = [c for k, c in enumerate(clusters) if k not in (i, j)] + [merged]
        clusters.sort(key=lambda members: members[0])
    return clusters


def cluster_names(clusters: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """Name clusters "cluster-1", "cluster-2", ... in the order :func:`agglomerate` gives."""
    return {f"cluster-{index}": list(sites) for index, sites in enumerate(clusters, start=1)}

"""Clustering sites by update direction: cosine similarity and average-linkage agglomeration."""

import pytest
import torch

from fedsilo.server.clustering import agglomerate, cluster_names, cosine_similarities


def _matrix(pairs: dict[tuple[str, str], float], names: list[str]) -> dict[str, dict[str, float]]:
    out = {a: {b: 1.0 if a == b else 0.0 for b in names} for a in names}
    for (a, b), value in pairs.items():
        out[a][b] = out[b][a] = value
    return out


def test_cosine_of_known_directions() -> None:
    updates = {
        "a": {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([0.0])},
        "b": {"w": torch.tensor([2.0, 0.0]), "v": torch.tensor([0.0])},
        "c": {"w": torch.tensor([0.0, 3.0]), "v": torch.tensor([0.0])},
        "d": {"w": torch.tensor([-1.0, 0.0]), "v": torch.tensor([0.0])},
    }

    similarity = cosine_similarities(updates)

    assert similarity["a"]["b"] == pytest.approx(1.0)
    assert similarity["a"]["c"] == pytest.approx(0.0)
    assert similarity["a"]["d"] == pytest.approx(-1.0)


def test_zero_update_has_no_direction() -> None:
    with pytest.raises(ValueError, match="site 'z'"):
        cosine_similarities({"a": {"w": torch.ones(2)}, "z": {"w": torch.zeros(2)}})


def test_average_linkage_groups_the_similar_pairs_in_any_input_order() -> None:
    names = ["d", "b", "c", "a"]
    pairs = {("a", "b"): 0.9, ("c", "d"): 0.8, ("a", "c"): 0.1, ("b", "d"): 0.2}

    clusters = agglomerate(_matrix(pairs, names), count=2)

    assert clusters == [["a", "b"], ["c", "d"]]
    assert agglomerate(_matrix(pairs, sorted(names)), count=2) == clusters
    assert cluster_names(clusters) == {"cluster-1": ["a", "b"], "cluster-2": ["c", "d"]}


def test_ties_go_to_the_pair_whose_names_sort_first() -> None:
    names = ["a", "b", "c"]
    clusters = agglomerate(
        _matrix({("a", "b"): 0.5, ("b", "c"): 0.5, ("a", "c"): 0.5}, names), count=2
    )

    assert clusters == [["a", "b"], ["c"]]


def test_count_must_fit() -> None:
    with pytest.raises(ValueError, match="cannot make 3 clusters of 2"):
        agglomerate(_matrix({}, ["a", "b"]), count=3)

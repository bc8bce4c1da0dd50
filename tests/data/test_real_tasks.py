"""The drug-review and Shakespeare tasks: determinism, the split, and gold kept apart."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedsilo.config import parse_config
from fedsilo.data.drug_review import LABELS, assign_conditions, build_drug_review_task
from fedsilo.data.icd10 import TaskData
from fedsilo.data.shakespeare import build_shakespeare_task, parse_play
from fedsilo.data.tasks import build_task


def _build(name: str, seed: int = 0, **task: object) -> TaskData:
    settings = {"name": name, "num_sites": 4, "examples_per_site": 16, "gold_size": 24, **task}
    return build_task(parse_config({"task": settings}, source="t").task, seed=seed)


@pytest.mark.parametrize("name", ["drug-review", "shakespeare"])
def test_same_seed_gives_the_same_task(name: str) -> None:
    assert _build(name, seed=5) == _build(name, seed=5)


@pytest.mark.parametrize("name", ["drug-review", "shakespeare"])
def test_another_seed_gives_another_split(name: str) -> None:
    first, second = _build(name, seed=1), _build(name, seed=2)

    assert [s.records for s in first.sites] != [s.records for s in second.sites]


@pytest.mark.parametrize("name", ["drug-review", "shakespeare"])
def test_no_gold_example_is_in_any_site(name: str) -> None:
    task = _build(name, seed=3)

    trained = {record for site in task.sites for record in site.records}
    assert len(task.gold) == 24
    assert not trained & set(task.gold)


def test_drug_review_gold_prompts_and_texts_never_reach_a_site() -> None:
    task = _build("drug-review", seed=0)

    prompts = {record.prompt for site in task.sites for record in site.records}
    assert not prompts & {record.prompt for record in task.gold}


def test_drug_review_answers_are_rating_classes_and_metric_is_sentiment() -> None:
    task = _build("drug-review")

    answers = {r.response for site in task.sites for r in site.records} | {
        r.response for r in task.gold
    }
    assert answers <= set(LABELS)
    assert task.metric == "sentiment"
    assert [len(site.records) for site in task.sites] == [16] * 4


def test_drug_review_clinics_hold_disjoint_conditions() -> None:
    task = build_drug_review_task(num_sites=4, examples_per_site=1000, gold_size=8, seed=0)

    conditions = [
        {r.prompt.split(" for ", 1)[1].split(":", 1)[0] for r in site.records}
        for site in task.sites
    ]
    for i, own in enumerate(conditions):
        for other in conditions[i + 1 :]:
            assert not own & other


def test_assign_conditions_balances_reviews_and_keeps_conditions_whole() -> None:
    conditions = ["a"] * 6 + ["b"] * 3 + ["c"] * 3 + ["d"]

    sites = assign_conditions(conditions, num_sites=2, rng=np.random.default_rng(0))

    assert sorted(i for site in sites for i in site) == list(range(13))
    assert sorted(len(site) for site in sites) == [6, 7]
    owners = Counter(c for site in sites for c in {conditions[i] for i in site})
    assert set(owners.values()) == {1}  # every condition sits at exactly one site


def test_assign_conditions_refuses_more_sites_than_conditions() -> None:
    with pytest.raises(ValueError, match="only 1"):
        assign_conditions(["a", "a"], num_sites=2, rng=np.random.default_rng(0))


def test_shakespeare_sites_are_play_roles_and_metric_is_next_token() -> None:
    task = build_shakespeare_task(num_sites=3, examples_per_site=8, gold_size=6, seed=0)

    assert task.metric == "next-token"
    for site in task.sites:
        roles = {record.prompt.split(" in ", 1)[0] for record in site.records}
        assert len(roles) == 1  # one speaker per site


def test_shakespeare_gold_next_lines_are_never_trained_next_lines() -> None:
    task = build_shakespeare_task(num_sites=6, examples_per_site=10_000, gold_size=30, seed=1)

    trained = {record.response for site in task.sites for record in site.records}
    assert not trained & {record.response for record in task.gold}


PLAY = """TITLE

ACT I.

Scene I. A hall.

[Enter Ann and Bob.]

ANN.
First line of Ann,
second line of Ann, [Aside] still Ann,
third line.

Bob.
Only one line.

Bob.
Bob again,
and Bob ends.
"""


def test_parse_play_pairs_lines_within_each_speech() -> None:
    pairs = parse_play(PLAY, play="test")

    assert [(p.role, p.line, p.next_line) for p in pairs] == [
        ("ANN", "First line of Ann,", "second line of Ann, still Ann,"),
        ("ANN", "second line of Ann, still Ann,", "third line."),
        ("Bob", "Bob again,", "and Bob ends."),
    ]


def test_metric_setting_replaces_the_tasks_own() -> None:
    assert _build("drug-review", metric="code").metric == "code"
    assert _build("icd10", metric="next-token").metric == "next-token"
    assert _build("icd10").metric == "code"


def test_unknown_metric_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="metric"):
        parse_config({"task": {"metric": "bleu"}}, source="t")

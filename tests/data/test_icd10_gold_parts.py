"""The ICD-10 gold standard in parts: unseen codes of trained categories, phrasings, ranking."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.config import parse_config
from fedsilo.data.icd10 import (
    TaskData,
    build_icd10_task,
    icd10_prompt,
    inclusion_terms,
    load_icd10_codes,
)
from fedsilo.data.records import ChatRecord
from fedsilo.data.tasks import build_task

PARTS: dict[str, Any] = {
    "num_sites": 4,
    "partition": "by-chapter",
    "alpha": 1.0,
    "examples_per_site": 120,
    "gold_size": 40,
    "seed": 0,
    "phrasing_size": 30,
    "ranking_candidates": 8,
}
SLOW_FIRST_CALL = settings(deadline=None, max_examples=8)


def _site_records(task: TaskData) -> list[ChatRecord]:
    records = [record for site in task.sites for record in site.records]
    assert all(isinstance(record, ChatRecord) for record in records)
    return [record for record in records if isinstance(record, ChatRecord)]


def _texts(records: Iterable[ChatRecord]) -> set[str]:
    return {record.prompt for record in records}


def test_every_unseen_code_has_a_trained_category() -> None:
    task = build_icd10_task(**PARTS)

    trained = {record.response[:3] for record in _site_records(task)}
    assert len(task.gold) == 40
    assert all(record.response[:3] in trained for record in task.gold)


def test_small_sites_still_cover_the_gold_categories() -> None:
    # Chapter 13 spreads 6,669 codes over 79 categories: 16 random codes would miss most
    # gold categories; the category-first sample covers the gold ones first.
    task = build_icd10_task(**{**PARTS, "examples_per_site": 16, "gold_size": 24})

    trained = {record.response[:3] for record in _site_records(task)}
    assert len(task.gold) == 24
    assert all(record.response[:3] in trained for record in task.gold)


def test_a_site_sample_spans_its_categories() -> None:
    codes = {code.code: code for code in load_icd10_codes()}
    task = build_icd10_task(**PARTS)

    for site in task.sites:
        chapter = codes[site.records[0].response].chapter  # type: ignore[union-attr]
        categories = {c.category for c in codes.values() if c.chapter == chapter}
        sampled = {record.response[:3] for record in site.records}  # type: ignore[union-attr]
        assert len(sampled) >= min(len(categories), 120) - 2  # gold may empty a category


def test_gold_drops_codes_whose_category_no_site_trains(caplog: pytest.LogCaptureFixture) -> None:
    # One code per site cannot cover 24 gold categories.
    args = {**PARTS, "examples_per_site": 1, "gold_size": 24, "phrasing_size": 0}

    with caplog.at_level(logging.WARNING, logger="fedsilo.data.icd10"):
        task = build_icd10_task(**args)

    trained = {record.response[:3] for record in _site_records(task)}
    assert 0 < len(task.gold) < 24
    assert all(record.response[:3] in trained for record in task.gold)
    assert "dropped" in caplog.text


def test_all_keeps_every_code_of_every_site() -> None:
    codes = load_icd10_codes()
    args = {**PARTS, "num_sites": 1, "chapters": ("10",), "examples_per_site": None}

    task = build_icd10_task(**args)

    chapter = [code for code in codes if code.chapter == "10"]
    gold = {record.response for record in task.gold}
    gold_texts = {code.description for code in chapter if code.code in gold}
    expected = [c for c in chapter if c.code not in gold and c.description not in gold_texts]
    assert len(task.sites[0].records) == len(expected)


def test_phrasings_are_inclusion_terms_of_trained_codes() -> None:
    task = build_icd10_task(**PARTS)

    trained = {record.response for record in _site_records(task)}
    assert len(task.phrasings) == 30
    for record in task.phrasings:
        assert record.response in trained
        term = record.prompt.removeprefix(icd10_prompt(""))
        assert term in inclusion_terms(record.response)


def test_known_inclusion_terms() -> None:
    assert "Stein-Leventhal syndrome" in inclusion_terms("E28.2")
    assert inclusion_terms("J20.5") == ("Acute bronchitis due to RSV",)
    assert inclusion_terms("I10.") == ()


def test_phrasing_texts_are_unique_to_their_code() -> None:
    descriptions = {code.description for code in load_icd10_codes()}
    task = build_icd10_task(**PARTS)

    for record in task.phrasings:
        term = record.prompt.removeprefix(icd10_prompt(""))
        assert term not in descriptions


def test_ranking_offers_the_reference_among_same_chapter_codes() -> None:
    chapters = {code.code: code.chapter for code in load_icd10_codes()}
    task = build_icd10_task(**PARTS)

    assert [item.record for item in task.ranking] == list(task.gold)
    for item in task.ranking:
        assert len(set(item.candidates)) == 8
        assert item.record.response in item.candidates
        assert {chapters[c] for c in item.candidates} == {chapters[item.record.response]}


def test_parts_are_off_by_default() -> None:
    args = {k: v for k, v in PARTS.items() if k not in ("phrasing_size", "ranking_candidates")}

    task = build_icd10_task(**args)

    assert task.phrasings == () and task.ranking == ()


def test_adding_parts_does_not_move_the_sites_or_the_headline_gold() -> None:
    args = {k: v for k, v in PARTS.items() if k not in ("phrasing_size", "ranking_candidates")}

    assert build_icd10_task(**args).gold == build_icd10_task(**PARTS).gold
    assert build_icd10_task(**args).sites == build_icd10_task(**PARTS).sites


def test_inclusion_terms_join_training_but_never_a_gold_phrasing() -> None:
    plain = build_icd10_task(**PARTS)
    extra = build_icd10_task(**{**PARTS, "inclusion_terms_in_training": True})

    added = _texts(_site_records(extra)) - _texts(_site_records(plain))
    assert added  # the sites' codes have inclusion terms
    assert extra.phrasings == plain.phrasings and extra.gold == plain.gold
    for site in extra.sites:
        codes = {r.response for r in site.records}  # type: ignore[union-attr]
        for record in site.records:
            assert isinstance(record, ChatRecord)
            assert record.response in codes


@SLOW_FIRST_CALL
@given(
    seed=st.integers(0, 2**31),
    partition=st.sampled_from(["by-chapter", "dirichlet"]),
    alpha=st.floats(0.05, 10.0),
    examples=st.sampled_from([8, 60, None]),
)
def test_no_gold_part_meets_any_site_data(
    seed: int, partition: str, alpha: float, examples: int | None
) -> None:
    task = build_icd10_task(
        **{
            **PARTS,
            "seed": seed,
            "partition": partition,
            "alpha": alpha,
            "examples_per_site": examples,
            "inclusion_terms_in_training": True,
        }
    )

    sites = _site_records(task)
    site_texts, site_codes = _texts(sites), {r.response for r in sites}
    assert not _texts(task.gold) & site_texts
    assert not {r.response for r in task.gold} & site_codes
    assert not _texts(task.phrasings) & site_texts
    assert not _texts(task.phrasings) & _texts(task.gold)
    assert {r.response for r in task.phrasings} <= site_codes


def test_same_seed_same_parts_other_seed_other_parts() -> None:
    first, again = build_icd10_task(**PARTS), build_icd10_task(**PARTS)
    other = build_icd10_task(**{**PARTS, "seed": 1})

    assert first == again
    assert first.phrasings != other.phrasings
    assert first.ranking != other.ranking


@pytest.mark.parametrize(
    ("override", "message"),
    [({"phrasing_size": -1}, "phrasing_size"), ({"ranking_candidates": 1}, "ranking")],
)
def test_rejects_bad_part_sizes(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_icd10_task(**{**PARTS, **override})


def test_config_builds_the_parts_and_only_sites_keep_their_chapters() -> None:
    settings_ = {
        "num_sites": 2,
        "examples_per_site": "all",
        "chapters": ["10", "4"],
        "gold_size": 20,
        "gold_phrasings": 20,
        "gold_ranking_candidates": 4,
        "train_on_inclusion_terms": True,
    }
    config = parse_config({"task": settings_}, source="t")
    whole = build_task(config.task, seed=0)
    only = parse_config(
        {"task": {**settings_, "only_sites": ["pulmonology"]}, "strategy": {"min_sites": 1}},
        source="t",
    )

    task = build_task(only.task, seed=0)

    assert len(whole.phrasings) == 20 and len(whole.ranking) == 20
    assert task.phrasings and all(r.response.startswith("J") for r in task.phrasings)
    assert task.ranking and all(i.record.response.startswith("J") for i in task.ranking)
    assert len(task.ranking) == len(task.gold)

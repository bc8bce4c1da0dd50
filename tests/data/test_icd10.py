"""The built-in ICD-10-CM task: the code list, the gold hold-out, and the non-IID split."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.data.icd10 import (
    CHAPTER_ORDER,
    SPECIALTIES,
    IcdCode,
    TaskData,
    build_icd10_task,
    default_chapters,
    icd10_prompt,
    load_icd10_codes,
)
from fedsilo.data.records import ChatRecord

DEMO: dict[str, Any] = {
    "num_sites": 4,
    "partition": "by-chapter",
    "alpha": 1.0,
    "examples_per_site": 32,
    "gold_size": 24,
    "seed": 0,
}
# The package load takes a couple of seconds the first time; later builds take milliseconds.
SLOW_FIRST_CALL = settings(deadline=None, max_examples=15)


def _codes_by_name() -> dict[str, IcdCode]:
    return {code.code: code for code in load_icd10_codes()}


def _site_records(task: TaskData) -> list[ChatRecord]:
    records = [record for site in task.sites for record in site.records]
    assert all(isinstance(record, ChatRecord) for record in records)
    return [record for record in records if isinstance(record, ChatRecord)]


def test_codes_are_billable_unique_and_sorted() -> None:
    codes = [code.code for code in load_icd10_codes()]

    assert len(codes) == len(set(codes))
    assert codes == sorted(codes, key=lambda c: c.replace(".", ""))
    assert "E11" not in codes  # a category with subcodes is not billable
    assert "I10" in codes  # a category without subcodes is


def test_known_code_has_its_description_and_chapter() -> None:
    code = _codes_by_name()["E11.9"]

    assert code == IcdCode(
        code="E11.9", description="Type 2 diabetes mellitus without complications", chapter="4"
    )
    assert code.category == "E11"


def test_loaded_list_is_a_copy() -> None:
    codes = load_icd10_codes()
    codes.clear()

    assert load_icd10_codes()


def test_every_chapter_has_a_distinct_specialty() -> None:
    chapters = {code.chapter for code in load_icd10_codes()}

    assert set(SPECIALTIES) == chapters == set(CHAPTER_ORDER)
    assert len(set(SPECIALTIES.values())) == len(SPECIALTIES)


def test_default_chapters_are_the_demo_four_up_to_four_sites() -> None:
    assert default_chapters(1) == default_chapters(4) == ("4", "9", "10", "13")
    assert len(default_chapters(7)) == 7
    assert len(default_chapters(30)) == 22


def test_records_ask_for_the_code_of_its_description() -> None:
    codes = _codes_by_name()

    task = build_icd10_task(**DEMO)

    for record in [*_site_records(task), *task.gold]:
        assert record.prompt == icd10_prompt(codes[record.response].description)


def test_sizes() -> None:
    task = build_icd10_task(**DEMO)

    assert len(task.sites) == 4
    assert [len(site.records) for site in task.sites] == [32] * 4
    assert len(task.gold) == 24
    assert len({record.response for record in task.gold}) == 24


@SLOW_FIRST_CALL
@given(
    seed=st.integers(0, 2**31),
    partition=st.sampled_from(["by-chapter", "dirichlet"]),
    alpha=st.floats(0.05, 10.0),
)
def test_gold_codes_and_descriptions_never_reach_a_site(
    seed: int, partition: str, alpha: float
) -> None:
    task = build_icd10_task(**{**DEMO, "seed": seed, "partition": partition, "alpha": alpha})

    site_records = _site_records(task)
    assert not {r.response for r in task.gold} & {r.response for r in site_records}
    assert not {r.prompt for r in task.gold} & {r.prompt for r in site_records}


def test_gold_is_spread_evenly_over_chapters() -> None:
    codes = _codes_by_name()

    task = build_icd10_task(**{**DEMO, "gold_size": 26})

    per_chapter = Counter(codes[record.response].chapter for record in task.gold)
    assert sorted(per_chapter.values()) == [6, 6, 7, 7]


def test_gold_categories_keep_other_codes_for_training() -> None:
    # Chapter 10 has 15 single-code categories among 360 codes: 150 unguided draws would
    # almost surely hit one.
    codes = load_icd10_codes()
    args = {**DEMO, "num_sites": 1, "chapters": ("10",), "gold_size": 150}
    task = build_icd10_task(**args)
    gold = {record.response for record in task.gold}

    trainable = Counter(code.category for code in codes if code.code not in gold)

    assert all(trainable[record.response[:3]] >= 1 for record in task.gold)


@SLOW_FIRST_CALL
@given(seed=st.integers(0, 2**31))
def test_by_chapter_sites_hold_disjoint_chapters(seed: int) -> None:
    codes = _codes_by_name()

    task = build_icd10_task(**{**DEMO, "seed": seed, "num_sites": 3, "chapters": CHAPTER_ORDER[:7]})

    chapters = [
        {codes[r.response].chapter for r in site.records if isinstance(r, ChatRecord)}
        for site in task.sites
    ]
    assert all(chapters)
    assert sum(len(c) for c in chapters) == len(set().union(*chapters))


def test_by_chapter_sites_are_named_after_their_specialties() -> None:
    codes = _codes_by_name()

    task = build_icd10_task(**DEMO)

    for site in task.sites:
        first = site.records[0]
        assert isinstance(first, ChatRecord)
        assert site.name == SPECIALTIES[codes[first.response].chapter]


def test_dirichlet_sites_are_numbered_hospitals() -> None:
    task = build_icd10_task(**{**DEMO, "partition": "dirichlet", "alpha": 100.0})

    assert [site.name for site in task.sites] == [f"hospital-{n}" for n in range(1, 5)]


def test_same_arguments_give_the_same_task() -> None:
    assert build_icd10_task(**DEMO) == build_icd10_task(**DEMO)


def test_another_seed_gives_another_split() -> None:
    first = build_icd10_task(**DEMO)
    second = build_icd10_task(**{**DEMO, "seed": 1})

    assert first.gold != second.gold
    assert first.sites != second.sites


def test_small_site_keeps_all_its_codes_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    # Chapter 22 (codes for special purposes) has only three billable codes.
    codes = load_icd10_codes()
    special = [code.code for code in codes if code.chapter == "22"]
    args = {**DEMO, "num_sites": 2, "chapters": ("4", "22"), "gold_size": 2}

    with caplog.at_level(logging.WARNING, logger="fedsilo.data.icd10"):
        task = build_icd10_task(**args)

    small = next(site for site in task.sites if site.name == "public-health")
    assert len(small.records) == len(special) - 1  # one went to the gold set
    assert "public-health" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"chapters": ("4", "99")}, "unknown chapter"),
        ({"chapters": ("4", "4", "9", "10")}, "more than once"),
        ({"chapters": ()}, "at least one"),
        ({"chapters": ("4", "9")}, "one chapter per site"),
        ({"gold_size": 100_000}, "gold_size"),
        ({"gold_size": 0}, "gold_size"),
        ({"examples_per_site": 0}, "examples_per_site"),
        ({"num_sites": 0}, "num_sites"),
        ({"seed": -1}, "seed"),
        ({"partition": "random"}, "partition"),
    ],
)
def test_rejects_bad_arguments(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_icd10_task(**{**DEMO, **override})

"""The ICD-10 edge-case sets: each holds what its name says, and nothing trained on."""

from __future__ import annotations

import pytest

from fedsilo.data.icd10 import TaskData, build_icd10_task, icd10_prompt, load_icd10_codes
from fedsilo.data.icd10_edge import (
    EMPTY_PROMPTS,
    LONG_INPUT_CHARS,
    RARE_MAX_TRAINED,
    EdgeCaseSet,
    build_icd10_edge_cases,
)

CHAPTERS = ("4", "9", "10", "13")


@pytest.fixture(scope="module")
def task() -> TaskData:
    return build_icd10_task(
        num_sites=4,
        partition="dirichlet",
        alpha=0.5,
        examples_per_site=64,
        gold_size=16,
        seed=2,
        chapters=CHAPTERS,
    )


@pytest.fixture(scope="module")
def cases(task: TaskData) -> dict[str, EdgeCaseSet]:
    return build_icd10_edge_cases(task, chapters=CHAPTERS, per_kind=8, seed=2)


def _trained(task: TaskData) -> dict[str, str]:
    return {r.response: site.name for site in task.sites for r in site.records}  # type: ignore[union-attr]


def _description(prompt: str) -> str:
    return prompt.removeprefix(icd10_prompt(""))


def test_same_seed_gives_the_same_cases(task: TaskData, cases: dict[str, EdgeCaseSet]) -> None:
    assert build_icd10_edge_cases(task, chapters=CHAPTERS, per_kind=8, seed=2) == cases


def test_every_kind_is_there_and_bounded(cases: dict[str, EdgeCaseSet]) -> None:
    assert set(cases) == {
        "rare-code", "near-duplicate", "unseen-chapter", "adversarial", "long-input", "empty"
    }  # fmt: skip
    for kind, case_set in cases.items():
        assert case_set.records, kind
        assert len(case_set.records) <= max(8, len(EMPTY_PROMPTS))


def test_held_out_kinds_never_hold_a_trained_or_gold_code(
    task: TaskData, cases: dict[str, EdgeCaseSet]
) -> None:
    trained = _trained(task)
    gold = {r.response for r in task.gold}
    for kind in ("rare-code", "near-duplicate", "unseen-chapter"):
        for record in cases[kind].records:
            assert record.response not in trained and record.response not in gold, kind


def test_rare_codes_have_a_category_only_one_site_trained_on(
    task: TaskData, cases: dict[str, EdgeCaseSet]
) -> None:
    trained = _trained(task)
    for record in cases["rare-code"].records:
        same_category = [code for code in trained if code[:3] == record.response[:3]]
        assert 1 <= len(same_category) <= RARE_MAX_TRAINED
        assert len({trained[code] for code in same_category}) == 1


def test_near_duplicates_differ_in_one_word_from_a_trained_description(
    task: TaskData, cases: dict[str, EdgeCaseSet]
) -> None:
    trained = [
        (_description(r.prompt).split(), r.response)
        for site in task.sites
        for r in site.records  # type: ignore[union-attr]
    ]
    for record in cases["near-duplicate"].records:
        words = _description(record.prompt).split()
        assert any(
            len(other) == len(words)
            and sum(a != b for a, b in zip(words, other, strict=True)) == 1
            and code != record.response
            for other, code in trained
        )


def test_unseen_chapter_codes_come_from_outside_the_task(cases: dict[str, EdgeCaseSet]) -> None:
    chapter_of = {code.code: code.chapter for code in load_icd10_codes()}
    chapters = {chapter_of[r.response] for r in cases["unseen-chapter"].records}
    assert len(chapters) == 1 and not chapters & set(CHAPTERS)


def test_adversarial_and_long_cases_keep_the_gold_answer(
    task: TaskData, cases: dict[str, EdgeCaseSet]
) -> None:
    gold = {r.response for r in task.gold}
    assert {r.response for r in cases["adversarial"].records} <= gold
    assert {r.response for r in cases["long-input"].records} <= gold
    assert all(len(r.prompt) > LONG_INPUT_CHARS for r in cases["long-input"].records)
    assert cases["adversarial"].records[0].prompt != task.gold[0].prompt


def test_empty_prompts_have_no_reference_and_are_scored_by_shape(
    cases: dict[str, EdgeCaseSet],
) -> None:
    assert cases["empty"].scoring == "code-shaped"
    assert {r.prompt for r in cases["empty"].records} == set(EMPTY_PROMPTS)

"""Gold evaluation on the tiny model: batching by length, intervals, and the gold parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.data.encode import encode_prompt
from fedsilo.data.icd10 import RankingItem, TaskData
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation import gold as gold_module
from fedsilo.evaluation.gold import (
    answer_scores,
    candidate_log_likelihoods,
    evaluate_gold,
    evaluate_task_gold,
    generate_answers,
    length_batches,
    ranking_part,
    reference_ranks,
    scores_and_answers,
)
from fedsilo.model import DEFAULT_TARGET_MODULES, attach_lora, load_base_model
from fedsilo.training.precision import forward_in, hold_base_weights_in

from ..lora_casts import keep_lora_input_casts, record_lora_input_casts

RECORDS = (
    ChatRecord("ICD-10-CM code for: Essential (primary) hypertension", "I10"),
    ChatRecord("ICD-10-CM code for: Asthma", "J45.909"),
    ChatRecord("ICD-10-CM code for: Type 2 diabetes mellitus without complications", "E11.9"),
    ChatRecord("ICD-10-CM code for: Gout", "M10.9"),
    ChatRecord("ICD-10-CM code for: Acute bronchitis due to respiratory syncytial virus", "J20.5"),
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[torch.nn.Module, object]:
    model, tokenizer = load_base_model(tiny_model_dir)
    return model, tokenizer


def test_length_batches_group_similar_lengths_and_keep_every_index() -> None:
    batches = length_batches([5, 1, 9, 3, 7], batch_size=2)

    assert batches == [[1, 3], [0, 4], [2]]
    with pytest.raises(ValueError, match="batch_size"):
        length_batches([1], batch_size=0)


class LengthEcho(torch.nn.Module):
    """Answers each prompt with one token: 50 + the prompt's length (its attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, object]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object):  # type: ignore[no-untyped-def]
        self.calls.append({"width": input_ids.shape[1], **kwargs})
        answer = 50 + attention_mask.sum(dim=1, keepdim=True)
        return torch.cat([input_ids, answer], dim=1)


def test_answers_come_back_in_prompt_order(tiny: tuple[torch.nn.Module, object]) -> None:
    _, tokenizer = tiny
    echo = LengthEcho()
    prompts = [record.prompt for record in RECORDS]

    answers = generate_answers(
        echo,
        tokenizer,
        prompts,
        system_prompt="S",
        max_new_tokens=3,
        batch_size=2,
        max_prompt_length=256,  # type: ignore[arg-type]
    )

    lengths = [len(encode_prompt(tokenizer, p, system_prompt="S")) for p in prompts]  # type: ignore[arg-type]
    assert len(set(lengths)) == len(lengths)
    assert answers == [tokenizer.decode([50 + n]) for n in lengths]  # type: ignore[attr-defined]
    # Batched by length: the widest batch pads only to its own longest prompt.
    assert sorted(call["width"] for call in echo.calls) == [*sorted(lengths)[1::2], max(lengths)]
    assert all(call["do_sample"] is False and call["use_cache"] is True for call in echo.calls)


def test_scores_do_not_depend_on_batching_or_order(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    settings = {"system_prompt": "S", "max_length": 96}

    one = answer_scores(model, tokenizer, RECORDS, batch_size=1, **settings)  # type: ignore[arg-type]
    many = answer_scores(model, tokenizer, RECORDS[::-1], batch_size=4, **settings)  # type: ignore[arg-type]

    assert many.losses[::-1] == pytest.approx(one.losses, abs=1e-4)
    assert many.log_likelihoods[::-1] == pytest.approx(one.log_likelihoods, abs=1e-3)
    assert many.tokens[::-1] == one.tokens
    for loss, likelihood, tokens in zip(one.losses, one.log_likelihoods, one.tokens, strict=True):
        assert likelihood == pytest.approx(-loss * tokens, rel=1e-5)


# At max_length 60 the short "Gout" record fits whole (one prefill) while the long prompts and
# the long answer are cut (scored and answered the separate way): both paths in one call.
@pytest.mark.parametrize(("batch_size", "max_length"), [(1, 256), (3, 256), (2, 60)])
def test_one_prefill_gives_the_separate_scores_and_answers(
    tiny: tuple[torch.nn.Module, object],
    batch_size: int,
    max_length: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer = tiny
    records = [*RECORDS, ChatRecord("ICD-10-CM code for: Gout", "M10.9 M10.9 M10.9 M10.9")]
    settings = {"system_prompt": "S", "batch_size": batch_size}
    shared: list[int] = []
    sharing = gold_module._shared_prefix

    def spy(*args: Any) -> tuple[int, object | None]:
        prefix, cache = sharing(*args)
        shared.append(prefix)
        return prefix, cache

    monkeypatch.setattr(gold_module, "_shared_prefix", spy)

    scores, answers = scores_and_answers(
        model,
        tokenizer,  # type: ignore[arg-type]
        records,
        max_new_tokens=6,
        max_length=max_length,
        **settings,  # type: ignore[arg-type]
    )

    alone = answer_scores(model, tokenizer, records, max_length=max_length, **settings)  # type: ignore[arg-type]
    generated = generate_answers(
        model,
        tokenizer,  # type: ignore[arg-type]
        [record.prompt for record in records],
        max_new_tokens=6,
        max_prompt_length=max_length,
        **settings,  # type: ignore[arg-type]
    )
    assert answers == generated
    assert any(answers)
    # The batches' shared prompt prefix (template, system prompt, "ICD-10-CM code for: ") ran
    # once per batch, not with every row.
    assert shared and min(shared) >= 8
    assert scores.losses == pytest.approx(alone.losses, abs=1e-4)
    assert scores.log_likelihoods == pytest.approx(alone.log_likelihoods, abs=1e-3)
    assert (scores.top1, scores.top5, scores.tokens) == (alone.top1, alone.top5, alone.tokens)


def test_ranks_match_scoring_each_candidate_alone(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    items = [
        RankingItem(RECORDS[0], ("I10", "I11.9", "I25.10")),
        RankingItem(RECORDS[1], ("J20.5", "J45.909", "J44.9", "J18.9")),
    ]
    settings = {"system_prompt": "S", "max_length": 96}

    ranks = reference_ranks(model, tokenizer, items, batch_size=3, **settings)  # type: ignore[arg-type]

    for item, rank in zip(items, ranks, strict=True):
        alone = {
            code: answer_scores(
                model,
                tokenizer,
                [ChatRecord(item.record.prompt, code)],
                batch_size=1,
                **settings,  # type: ignore[arg-type]
            ).log_likelihoods[0]
            for code in item.candidates
        }
        reference = alone[item.record.response]
        assert rank == 1 + sum(score > reference for score in alone.values())


def test_ties_rank_the_reference_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_scores(*args: object, **kwargs: object) -> list[list[float]]:
        return [[-1.0, -1.0, -3.0], [-0.5, -2.0, -9.0]]

    monkeypatch.setattr(gold_module, "candidate_log_likelihoods", fake_scores)
    items = [
        RankingItem(ChatRecord("p", "A"), ("A", "B", "C")),  # A ties with B
        RankingItem(ChatRecord("q", "F"), ("D", "E", "F")),  # F is last
    ]

    ranks = reference_ranks(None, None, items, system_prompt=None, max_length=8, batch_size=2)  # type: ignore[arg-type]

    assert ranks == [2, 3]


@pytest.mark.parametrize(("batch_size", "max_length"), [(1, 256), (3, 256), (2, 60)])
def test_shared_prompt_scores_equal_scoring_each_pair(
    tiny: tuple[torch.nn.Module, object], batch_size: int, max_length: int
) -> None:
    model, tokenizer = tiny
    items = [
        RankingItem(RECORDS[0], ("I10", "I11.9", "I25.10")),
        RankingItem(RECORDS[2], ("E11.9", "E10.65", "E78.5")),
        RankingItem(RECORDS[1], ("J45.909", "J44.9")),
        RankingItem(RECORDS[4], ("J20.5", "J45.909", "J18.9")),
    ]

    shared = candidate_log_likelihoods(
        model,
        tokenizer,
        items,
        system_prompt="S",
        max_length=max_length,
        batch_size=batch_size,  # type: ignore[arg-type]
    )

    for item, scores in zip(items, shared, strict=True):
        pairs = [ChatRecord(item.record.prompt, code) for code in item.candidates]
        alone = answer_scores(
            model,
            tokenizer,
            pairs,
            system_prompt="S",
            max_length=max_length,
            batch_size=1,  # type: ignore[arg-type]
        ).log_likelihoods
        if max_length >= 256:  # nothing cut: exactly the per-pair scores
            assert scores == pytest.approx(alone, abs=1e-3)
        else:  # cut prompts: every candidate sees the same (shortest) prompt
            assert len(scores) == len(alone)
            assert all(score < 0 for score in scores)


def test_candidates_continue_their_prompt_in_one_row_per_item(
    tiny: tuple[torch.nn.Module, object],
) -> None:
    model, tokenizer = tiny
    items = [
        RankingItem(RECORDS[0], ("I10", "I11.9", "I25.10")),
        RankingItem(RECORDS[1], ("J45.909", "J44.9")),
    ]
    rows_seen: list[int] = []
    decoder = gold_module.decoder_and_head(model)[0]
    hook = decoder.register_forward_hook(
        lambda _module, _args, kwargs, _out: rows_seen.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    try:
        candidate_log_likelihoods(
            model, tokenizer, items, system_prompt="S", max_length=256, batch_size=2
        )
    finally:
        hook.remove()

    # The shared prefix at batch 1, the two prompts, then the five candidates in two rows: the
    # prompts' cache is never copied once per candidate.
    assert max(rows_seen) == 2


def test_ranking_part_counts_top1_and_top5() -> None:
    figures = ranking_part([1, 2, 6, 1], candidates=10)

    assert figures["top1"] == 0.5 and figures["top5"] == 0.75
    assert figures["count"] == 4 and figures["candidates"] == 10
    low, high = figures["top1_ci95"]  # type: ignore[misc]
    assert 0 <= low <= 0.5 <= high <= 1


def test_gold_metrics_carry_intervals(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny

    metrics = evaluate_gold(
        model,
        tokenizer,  # type: ignore[arg-type]
        RECORDS,
        system_prompt="S",
        max_new_tokens=3,
        batch_size=2,
        max_length=96,
        metric="next-token",
    )

    assert metrics.category_accuracy_ci95 is not None and metrics.accuracy_ci95 is not None
    low, high = metrics.category_accuracy_ci95
    assert low <= metrics.category_accuracy <= high


def _three_part_task() -> TaskData:
    """An ICD-10 task with every gold part: unseen codes, phrasings, ranking."""
    return TaskData(
        name="icd10",
        system_prompt="S",
        sites=(),
        gold=RECORDS[:3],
        phrasings=RECORDS[3:],
        ranking=tuple(RankingItem(r, tuple(sorted({r.response, "A00.0"}))) for r in RECORDS[:3]),
    )


def _lora_model(tiny_model_dir: Path) -> tuple[torch.nn.Module, Any]:
    """The tiny model with a LoRA adapter whose B is not zero, so the adapter matters."""
    base, tokenizer = load_base_model(tiny_model_dir)
    model = attach_lora(
        base, rank=4, alpha=8.0, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, init_seed=0
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    return model, tokenizer


def test_task_gold_reports_every_part(tiny: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = tiny
    task = _three_part_task()

    metrics = evaluate_task_gold(
        model,
        tokenizer,  # type: ignore[arg-type]
        task,
        max_new_tokens=3,
        batch_size=2,
        max_length=96,
    )

    assert set(metrics.parts) == {"unseen-code", "phrasing", "ranking"}
    assert metrics.parts["unseen-code"]["count"] == metrics.count == 3
    assert metrics.parts["phrasing"]["count"] == 2
    assert metrics.parts["ranking"]["candidates"] == 2
    assert metrics.parts["unseen-code"]["category_accuracy"] == metrics.category_accuracy
    assert metrics.parts["unseen-code"]["category_accuracy_ci95"] == list(
        metrics.category_accuracy_ci95 or ()
    )


def test_shared_prompt_scores_hold_for_a_lora_model(tiny_model_dir: Path) -> None:
    model, tokenizer = _lora_model(tiny_model_dir)
    model.train(False)
    items = [
        RankingItem(RECORDS[3], ("M10.9", "M1A.00X0", "E11.9")),
        RankingItem(RECORDS[0], ("I10", "I11.9")),
    ]

    shared = candidate_log_likelihoods(
        model, tokenizer, items, system_prompt="S", max_length=256, batch_size=2
    )

    for item, scores in zip(items, shared, strict=True):
        pairs = [ChatRecord(item.record.prompt, code) for code in item.candidates]
        alone = answer_scores(
            model, tokenizer, pairs, system_prompt="S", max_length=256, batch_size=1
        ).log_likelihoods
        assert scores == pytest.approx(alone, abs=1e-3)


def test_bf16_scores_are_the_same_without_peft_input_casts(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = _lora_model(tiny_model_dir)
    hold_base_weights_in(model, "bf16")
    model.train(False)
    task = _three_part_task()
    casting = record_lora_input_casts(model)

    def score() -> object:
        with forward_in(model, "bf16"):
            return evaluate_task_gold(
                model,
                tokenizer,  # type: ignore[arg-type]
                task,
                max_new_tokens=3,
                batch_size=2,
                max_length=96,
            )

    uncast = score()
    assert casting and not any(casting)
    casting.clear()
    keep_lora_input_casts(monkeypatch)
    cast = score()

    assert casting and all(casting)
    assert uncast == cast

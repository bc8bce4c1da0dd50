"""Gold-set evaluation at the server: greedy answers scored by the task's metric, plus the loss.

The gold set is held out from every site. Each answer is generated greedily from the same chat
prompt a site trains on; the loss is the mean, over examples, of the per-token cross-entropy
on the reference answer (teacher forcing), so it is comparable across rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.config.schema import MetricName
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, encode_prompt, encode_record
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.metrics import TEXT_SUMMARIES, GoldMetrics, summarize_next_token


def _left_padded(prompts: Sequence[Sequence[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int,
) -> list[str]:
    """Greedy answers to ``prompts`` (chat template applied), decoded without special tokens."""
    pad_id = int(tokenizer.pad_token_id)
    # A transformers or peft causal LM; both forward `generate` to the base model.
    generate = cast(Callable[..., torch.Tensor], model.generate)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [
            encode_prompt(tokenizer, prompt, system_prompt=system_prompt)[-max_prompt_length:]
            for prompt in chunk
        ]
        batch = _left_padded(encoded, pad_id=pad_id)
        output = generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


@dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced scores of the reference answers: per example loss, pooled token hits."""

    losses: list[float]
    top1_hits: int
    top5_hits: int
    tokens: int


def token_hits(logits: torch.Tensor, targets: torch.Tensor, *, k: int) -> int:
    """How many scored targets (not IGNORE_INDEX) are among the top-``k`` logits at their place.

    ``logits`` is (batch, positions, vocab) and ``targets`` (batch, positions), already aligned
    (``logits[:, t]`` predicts ``targets[:, t]``).
    """
    scored = targets != IGNORE_INDEX
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    hit = (top == targets.unsqueeze(-1)).any(dim=-1) & scored
    return int(hit.sum())


@torch.no_grad()
def answer_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    max_length: int,
    batch_size: int,
) -> AnswerScores:
    """Per-example mean cross-entropy of the reference answer, and its top-1/top-5 hits."""
    pad_id = int(tokenizer.pad_token_id)
    losses: list[float] = []
    top1 = top5 = tokens = 0
    for start in range(0, len(records), batch_size):
        examples = [
            encode_record(tokenizer, record, system_prompt=system_prompt, max_length=max_length)
            for record in records[start : start + batch_size]
        ]
        batch = collate(examples, pad_id=pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t + 1.
        targets = batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        losses.extend((token_loss.sum(dim=1) / counted).tolist())
        top1 += token_hits(logits[:, :-1], targets, k=1)
        top5 += token_hits(logits[:, :-1], targets, k=5)
        tokens += int((targets != IGNORE_INDEX).sum())
    return AnswerScores(losses, top1, top5, tokens)


def answer_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    max_length: int,
    batch_size: int,
) -> list[float]:
    """Per-example mean cross-entropy of the reference answer given the prompt."""
    return answer_scores(
        model,
        tokenizer,
        records,
        system_prompt=system_prompt,
        max_length=max_length,
        batch_size=batch_size,
    ).losses


def evaluate_gold(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gold: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    metric: MetricName = "code",
) -> GoldMetrics:
    """Score ``gold`` with ``metric``; every metric also reports the mean answer loss.

    - ``"code"``: greedy answers; ICD-10-CM exact match and 3-character category match.
    - ``"sentiment"``: greedy answers; rating-class match and adjacent-class match.
    - ``"exact"``, ``"label"``, ``"similarity"``: greedy free-text answers, see
      :data:`fedsilo.evaluation.metrics.METRIC_SCORES`.
    - ``"next-token"``: no generation; teacher-forced top-1 and top-5 next-token accuracy over
      every token of the reference answers.
    """
    was_training = model.training
    model.train(False)
    try:
        if metric == "next-token":
            scores = answer_scores(
                model,
                tokenizer,
                gold,
                system_prompt=system_prompt,
                max_length=max_length,
                batch_size=batch_size,
            )
            return summarize_next_token(
                scores.top1_hits, scores.top5_hits, scores.tokens, scores.losses
            )
        answers = generate_answers(
            model,
            tokenizer,
            [record.prompt for record in gold],
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_prompt_length=max_length,
        )
        losses = answer_losses(
            model,
            tokenizer,
            gold,
            system_prompt=system_prompt,
            max_length=max_length,
            batch_size=batch_size,
        )
    finally:
        model.train(was_training)
    return TEXT_SUMMARIES[metric](answers, [record.response for record in gold], losses)

"""Gold-set evaluation at the server: greedy answers scored by exact match, plus the loss.

The gold set is held out from every site. Each answer is generated greedily from the same chat
prompt a site trains on; the loss is the mean, over examples, of the per-token cross-entropy
on the reference answer (teacher forcing), so it is comparable across rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, encode_prompt, encode_record
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.metrics import GoldMetrics, summarize


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


@torch.no_grad()
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
    pad_id = int(tokenizer.pad_token_id)
    losses: list[float] = []
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
    return losses


def evaluate_gold(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gold: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
) -> GoldMetrics:
    """Exact-match accuracy, 3-character category accuracy and mean loss on ``gold``."""
    was_training = model.training
    model.train(False)
    try:
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
    return summarize(answers, [record.response for record in gold], losses)

"""Gold-set evaluation at the server: greedy answers scored by the task's metric, plus the loss.

The gold set is held out from every site. Each answer is generated greedily from the same chat
prompt a site trains on; the loss is the mean, over examples, of the per-token cross-entropy
on the reference answer (teacher forcing), so it is comparable across rounds. Every figure
comes with a 95% bootstrap interval over the records, and a task's gold parts (for ICD-10:
unseen codes, phrasings, closed-set ranking) are scored and reported apart.

Speed: prompts are batched by length (little padding); each prompt runs once with its reference
answer, which gives the loss, and greedy generation continues on that pass's KV cache cut back
to the prompt (:func:`scores_and_answers`: 1.5x faster than a prefill for each, same answers
on SmolLM2's demo gold set); ranking scores all candidates by batched teacher forcing, each
prompt run once and its KV cache shared by its candidates. In both, the prompt prefix a batch's
rows share (chat template and system prompt) runs once and its KV cache is repeated for the
rows. The model's dtype is left as the caller set it; only the loss is taken in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.config.schema import MetricName
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, encode_prompt, encode_record
from fedsilo.data.icd10 import RankingItem, TaskData
from fedsilo.data.packing import common_prefix_length
from fedsilo.data.records import ChatRecord
from fedsilo.evaluation.bootstrap import bootstrap_ci
from fedsilo.evaluation.metrics import (
    RECORD_SCORES,
    TEXT_SUMMARIES,
    GoldMetrics,
    PartMetrics,
    summarize_next_token,
)
from fedsilo.training.device import model_device, on_device
from fedsilo.training.loss import additive_attention_mask, decoder_and_head


def _left_padded(prompts: Sequence[Sequence[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# Shorter shared prefixes are run with their rows: a separate pass would not pay for itself.
_MIN_SHARED_PREFIX = 8


def _shared_prefix(
    decoder: torch.nn.Module, prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[int, object | None]:
    """The prompt prefix every row shares, run once: its length and the rows' KV cache of it.

    The prefix stops one token short of the shortest prompt, so every row keeps the position
    that predicts its first answer token. Chat prompts of one task share their template and
    system prompt (37 of about 54 tokens for ICD-10 coding). The prefix is run at batch 1 and
    its keys and values repeated for every row: the rows then continue it exactly as if each
    had run it itself. Shorter than ``_MIN_SHARED_PREFIX``: (0, None), nothing shared.
    """
    common = min(common_prefix_length(prompts), min(len(prompt) for prompt in prompts) - 1)
    if common < _MIN_SHARED_PREFIX:
        return 0, None
    prefix = torch.tensor([list(prompts[0][:common])], dtype=torch.long, device=device)
    cache = decoder(input_ids=prefix, use_cache=True).cache
    cache.batch_repeat_interleave(len(prompts))
    return common, cache


def _with_prefix(mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """``mask`` (rows, width) with ``prefix`` attended columns in front."""
    return torch.cat([torch.ones_like(mask[:, :1]).expand(-1, prefix), mask], dim=1)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (shortest first), so padding is small.

    Every index appears once; callers put each result back at its index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda index: (lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
    """Greedy answers to ``prompts`` (chat template applied), decoded without special tokens.

    Prompts are batched by length and decoded with the KV cache; answers come back in the
    order of ``prompts``.
    """
    pad_id = int(tokenizer.pad_token_id)
    # A transformers or peft causal LM; both forward `generate` to the base model.
    generate = cast(Callable[..., torch.Tensor], model.generate)
    encoded = [
        encode_prompt(tokenizer, prompt, system_prompt=system_prompt)[-max_prompt_length:]
        for prompt in prompts
    ]
    answers = [""] * len(prompts)
    device = model_device(model)
    for indices in length_batches([len(ids) for ids in encoded], batch_size):
        batch = on_device(_left_padded([encoded[i] for i in indices], pad_id=pad_id), device)
        output = generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()
        for index, answer in zip(
            indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
        ):
            answers[index] = answer
    return answers


@dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced scores of the reference answers, one entry per record.

    ``losses`` is each record's mean per-token cross-entropy, ``log_likelihoods`` its summed
    log-probability of the whole answer, ``top1``/``top5`` how many of its ``tokens`` answer
    tokens were the model's first or among its first five guesses.
    """

    losses: list[float]
    log_likelihoods: list[float]
    top1: list[int]
    top5: list[int]
    tokens: list[int]

    @property
    def top1_hits(self) -> int:
        return sum(self.top1)

    @property
    def top5_hits(self) -> int:
        return sum(self.top5)


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
    """Teacher-forced scores of each record's reference answer (batched by length)."""
    pad_id = int(tokenizer.pad_token_id)
    examples = [
        encode_record(tokenizer, record, system_prompt=system_prompt, max_length=max_length)
        for record in records
    ]
    count = len(examples)
    decoder, head = decoder_and_head(model)
    device = model_device(model)
    scores = _ScoreSheet(count)
    for indices in length_batches([len(e.input_ids) for e in examples], batch_size):
        batch = on_device(collate([examples[i] for i in indices], pad_id=pad_id), device)
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        scores.record(indices, head, hidden, batch["labels"])
    return scores.result()


class _ScoreSheet:
    """Per-record teacher-forced figures, filled a batch at a time."""

    def __init__(self, count: int) -> None:
        self.losses, self.likelihoods = [0.0] * count, [0.0] * count
        self.top1, self.top5, self.tokens = [0] * count, [0] * count, [0] * count

    def record(
        self,
        indices: Sequence[int],
        head: torch.nn.Module,
        hidden: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Score one batch: row ``r`` of ``hidden``/``labels`` is record ``indices[r]``."""
        # Position t predicts token t + 1; only answer positions are scored, so the LM head
        # runs on those alone. The loss is taken in float32 whatever the model's precision.
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][scored]).float()
        wanted = targets[scored]
        rows = scored.nonzero()[:, 0]
        token_loss = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        width = len(indices)
        # Per-row figures come back to the CPU once per batch, not once per value.
        summed = torch.zeros(width, device=hidden.device).index_add(0, rows, token_loss).cpu()
        counted = torch.bincount(rows, minlength=width).cpu()
        hits1 = torch.bincount(rows[best[:, 0] == wanted], minlength=width).cpu()
        hits5 = torch.bincount(rows[(best == wanted[:, None]).any(dim=-1)], minlength=width).cpu()
        for row, index in enumerate(indices):
            self.losses[index] = float(summed[row] / counted[row].clamp(min=1))
            self.likelihoods[index] = -float(summed[row])
            self.top1[index], self.top5[index] = int(hits1[row]), int(hits5[row])
            self.tokens[index] = int(counted[row])

    def result(self) -> AnswerScores:
        return AnswerScores(self.losses, self.likelihoods, self.top1, self.top5, self.tokens)


@torch.no_grad()
def scores_and_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[ChatRecord],
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
) -> tuple[AnswerScores, list[str]]:
    """The reference answers' teacher-forced scores and the greedy answers, one prefill each.

    The same figures, up to float rounding, as :func:`answer_scores` and
    :func:`generate_answers` (with ``max_prompt_length=max_length``), for about two thirds of
    their compute: each batch runs every prompt with its reference answer once (prompts
    left-padded to a common end, answers right-padded after it). The reference is scored from
    that pass; greedy decoding starts from the token the prompt's last position predicts and
    continues on the pass's key-value cache cut back to the prompts. A record whose prompt
    ``max_length`` cuts differently for scoring than for generation (prompt and answer together
    too long) is scored and answered the separate way.
    """
    pad_id = int(tokenizer.pad_token_id)
    examples = [
        encode_record(tokenizer, record, system_prompt=system_prompt, max_length=max_length)
        for record in records
    ]
    splits: list[int] = []
    shared: list[int] = []
    separate: list[int] = []
    for index, (record, example) in enumerate(zip(records, examples, strict=True)):
        split = next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)
        asked = encode_prompt(tokenizer, record.prompt, system_prompt=system_prompt)
        same_prompt = list(example.input_ids[:split]) == asked[-max_length:]
        (shared if split > 0 and same_prompt else separate).append(index)
        splits.append(split)
    scores = _ScoreSheet(len(records))
    answers = [""] * len(records)
    decoder, head = decoder_and_head(model)
    device = model_device(model)
    for rows in length_batches([splits[i] for i in shared], batch_size):
        indices = [shared[row] for row in rows]
        prefix, prefix_cache = _shared_prefix(
            decoder, [examples[i].input_ids[: splits[i]] for i in indices], device
        )
        # Below, "prompt" is what follows the shared prefix.
        prompts = [examples[i].input_ids[prefix : splits[i]] for i in indices]
        replies = [examples[i].input_ids[splits[i] :] for i in indices]
        width = max(len(prompt) for prompt in prompts)
        shape = (len(indices), width + max(len(reply) for reply in replies))
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            end = width + len(reply)
            input_ids[row, width - len(prompt) : end] = torch.tensor((*prompt, *reply))
            mask[row, width - len(prompt) : end] = 1
            labels[row, width:end] = torch.tensor(reply)
        input_ids, labels = input_ids.to(device), labels.to(device)
        mask = _with_prefix(mask.to(device), prefix)
        out = decoder(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0)[:, prefix:],
            cache=prefix_cache,
            use_cache=True,
        )
        scores.record(indices, head, out.last_hidden_state, labels)
        cache = out.cache
        cache.crop(width - shape[1])  # keep the prompts' keys and values only
        first = head(out.last_hidden_state[:, width - 1]).float().argmax(dim=-1)
        new_tokens = _greedy_continuation(
            decoder,
            head,
            cache,
            mask[:, : prefix + width],
            first,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad_id,
        )
        decoded = tokenizer.batch_decode(new_tokens.cpu(), skip_special_tokens=True)
        for index, answer in zip(indices, decoded, strict=True):
            answers[index] = answer
    if separate:
        alone = [records[i] for i in separate]
        kept = answer_scores(
            model,
            tokenizer,
            alone,
            system_prompt=system_prompt,
            max_length=max_length,
            batch_size=batch_size,
        )
        said = generate_answers(
            model,
            tokenizer,
            [record.prompt for record in alone],
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_prompt_length=max_length,
        )
        for position, index in enumerate(separate):
            scores.losses[index], scores.likelihoods[index] = (
                kept.losses[position],
                kept.log_likelihoods[position],
            )
            scores.top1[index], scores.top5[index] = kept.top1[position], kept.top5[position]
            scores.tokens[index], answers[index] = kept.tokens[position], said[position]
    return scores.result(), answers


def _greedy_continuation(
    decoder: torch.nn.Module,
    head: torch.nn.Module,
    cache: object,
    prompt_mask: torch.Tensor,
    first: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
) -> torch.Tensor:
    """Greedy tokens after left-padded prompts whose keys and values ``cache`` holds.

    ``first`` is each row's first token (read off its prompt's last position). As in
    ``generate``: a row that has produced ``eos_id`` continues with ``pad_id``, and decoding
    stops once every row has ended or ``max_new_tokens`` tokens are out.
    """
    token = first
    tokens = [token]
    ended = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
    mask = prompt_mask
    position = prompt_mask.sum(dim=1, keepdim=True)
    for _ in range(max_new_tokens - 1):
        if bool(ended.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        hidden = decoder(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        position = position + 1
        token = head(hidden[:, -1]).float().argmax(dim=-1)
        token = torch.where(ended, torch.full_like(token, pad_id), token)
        tokens.append(token)
        if eos_id is not None:
            ended = ended | (token == eos_id)
    return torch.stack(tokens, dim=1)


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


def _prompt_and_answers(
    tokenizer: PreTrainedTokenizerBase,
    item: RankingItem,
    *,
    system_prompt: str | None,
    max_length: int,
) -> tuple[list[int], list[list[int]]]:
    """The item's prompt ids and each candidate's answer ids, cut as training cuts them.

    Each (prompt, candidate) is encoded as a training example; where ``max_length`` cuts the
    prompt, all candidates share the shortest kept prompt (the one the longest answer leaves).
    """
    prompts, answers = [], []
    for candidate in item.candidates:
        example = encode_record(
            tokenizer,
            ChatRecord(prompt=item.record.prompt, response=candidate),
            system_prompt=system_prompt,
            max_length=max_length,
        )
        start = next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), None)
        if start is None or start == 0:
            raise ValueError(
                f"max_length={max_length} leaves no prompt or no answer token for candidate "
                f"{candidate!r}"
            )
        prompts.append(list(example.input_ids[:start]))
        answers.append(list(example.input_ids[start:]))
    return min(prompts, key=len), answers


@torch.no_grad()
def candidate_log_likelihoods(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[RankingItem],
    *,
    system_prompt: str | None,
    max_length: int,
    batch_size: int,
) -> list[list[float]]:
    """Each candidate's teacher-forced log-likelihood as the answer to its item's prompt.

    The answer is the candidate's tokens and the end of turn. Each prompt runs once (a batch of
    ``batch_size`` prompts of similar length, left-padded, only the last position's logits
    kept); its candidates then continue its key-value cache side by side in one row, each
    seeing the prompt and its own earlier tokens only. Equal, up to float rounding, to scoring
    every (prompt, candidate) pair alone.
    """
    pad_id = int(tokenizer.pad_token_id)
    encoded = [
        _prompt_and_answers(tokenizer, item, system_prompt=system_prompt, max_length=max_length)
        for item in items
    ]
    scores: list[list[float]] = [[] for _ in items]
    decoder, head = decoder_and_head(model)
    device = model_device(model)
    for indices in length_batches([len(prompt) for prompt, _ in encoded], batch_size):
        prefix, prefix_cache = _shared_prefix(decoder, [encoded[i][0] for i in indices], device)
        batch = on_device(
            _left_padded([encoded[i][0][prefix:] for i in indices], pad_id=pad_id), device
        )
        prompt_mask = _with_prefix(batch["attention_mask"], prefix)
        prompt_out = decoder(
            input_ids=batch["input_ids"],
            attention_mask=prompt_mask,
            position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0)[:, prefix:],
            cache=prefix_cache,
            use_cache=True,
        )
        # Each prompt's last position predicts its candidates' first token.
        first = torch.log_softmax(head(prompt_out.last_hidden_state[:, -1]).float(), dim=-1)
        # Each item's candidates continue its cached prompt side by side in one row. A row per
        # candidate would copy the item's cached keys and values once per candidate, which
        # took more time than the candidates' own tokens.
        rows = _candidate_rows([encoded[i][1] for i in indices], pad_id=pad_id)
        allowed = torch.cat(
            [
                prompt_mask.bool()[:, None, :].expand(-1, rows.width, -1)
                & rows.real[:, :, None].to(device),
                rows.allowed.to(device),
            ],
            dim=2,
        )
        hidden = decoder(
            input_ids=rows.input_ids.to(device),
            attention_mask=additive_attention_mask(decoder, allowed),
            position_ids=prompt_mask.sum(dim=1, keepdim=True) + rows.offsets.to(device),
            cache=prompt_out.cache,
            use_cache=True,
        ).last_hidden_state
        owner = rows.owner.to(device)
        totals = first[rows.item.to(device), rows.first_token.to(device)]
        # Only positions followed by a token of their own candidate are projected onto the
        # vocabulary (the last token of each candidate, and padding, never reach the head).
        if rows.scored_row.numel():
            token_scores = _target_log_probs(
                head,
                hidden[rows.scored_row.to(device), rows.scored_column.to(device)],
                rows.scored_target.to(device),
            )
            totals = totals.index_add(0, owner, token_scores)
        position = 0
        per_row = totals.tolist()
        for i in indices:
            count = len(encoded[i][1])
            scores[i] = per_row[position : position + count]
            position += count
    return scores


@dataclass(frozen=True)
class _CandidateRows:
    """Each item's candidates packed in one row after its prompt (see candidate_log_likelihoods).

    Candidate ``c`` (numbered over all items in order) sits in row ``item[c]``; a candidate
    token sees its item's prompt (the cache) and its own earlier tokens, nothing else.
    """

    input_ids: torch.Tensor  # (items, width) long, padded with pad_id
    offsets: torch.Tensor  # (items, width) long: each token's place within its candidate
    real: torch.Tensor  # (items, width) bool: a candidate's token, not padding
    allowed: torch.Tensor  # (items, width, width) bool: which new tokens each token sees
    item: torch.Tensor  # (candidates,) long: the row of each candidate
    first_token: torch.Tensor  # (candidates,) long: each candidate's first token
    scored_row: torch.Tensor  # (scored,) long: row and column of each position that
    scored_column: torch.Tensor  # predicts a later token of its candidate,
    scored_target: torch.Tensor  # the token it predicts
    owner: torch.Tensor  # and the candidate it belongs to

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def _candidate_rows(answers: Sequence[Sequence[Sequence[int]]], *, pad_id: int) -> _CandidateRows:
    """:class:`_CandidateRows` of each item's candidate answers (token ids)."""
    width = max(sum(len(answer) for answer in item) for item in answers)
    input_ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
    offsets = torch.zeros((len(answers), width), dtype=torch.long)
    segments = torch.zeros((len(answers), width), dtype=torch.long)  # 0: padding
    item_of: list[int] = []
    first_tokens: list[int] = []
    scored: list[tuple[int, int, int, int]] = []  # (row, column, target, candidate)
    for row, item in enumerate(answers):
        column = 0
        for answer in item:
            candidate = len(item_of)
            item_of.append(row)
            first_tokens.append(answer[0])
            end = column + len(answer)
            input_ids[row, column:end] = torch.tensor(answer, dtype=torch.long)
            offsets[row, column:end] = torch.arange(len(answer))
            segments[row, column:end] = candidate + 1
            scored += [
                (row, column + place, target, candidate) for place, target in enumerate(answer[1:])
            ]
            column = end
    real = segments > 0
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same = segments[:, :, None] == segments[:, None, :]
    # A padding position sees itself only, so that no softmax row is empty.
    allowed = (causal & same & real[:, None, :]) | (
        ~real[:, :, None] & (index[None, :] == index[:, None])
    )
    scored_row, scored_column, scored_target, owner = (
        torch.tensor([entry[field] for entry in scored], dtype=torch.long) for field in range(4)
    )
    return _CandidateRows(
        input_ids=input_ids,
        offsets=offsets,
        real=real,
        allowed=allowed,
        item=torch.tensor(item_of, dtype=torch.long),
        first_token=torch.tensor(first_tokens, dtype=torch.long),
        scored_row=scored_row,
        scored_column=scored_column,
        scored_target=scored_target,
        owner=owner,
    )


def _target_log_probs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256
) -> torch.Tensor:
    """log p(target) for each row of ``hidden``, in float32, a chunk of rows at a time.

    Chunks keep the float32 logits small enough to stay in cache between the projection and
    the log-sum-exp; no full log-softmax is written.
    """
    parts = []
    for begin in range(0, hidden.shape[0], chunk):
        logits = head(hidden[begin : begin + chunk]).float()
        wanted = targets[begin : begin + chunk]
        chosen = logits.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
        parts.append(chosen - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts)


def reference_ranks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[RankingItem],
    *,
    system_prompt: str | None,
    max_length: int,
    batch_size: int,
) -> list[int]:
    """Each item's reference answer's rank (1 = best) among its candidates, by likelihood.

    Candidates are scored by :func:`candidate_log_likelihoods`. A candidate that ties with the
    reference ranks ahead of it, so ties never flatter.
    """
    scores = candidate_log_likelihoods(
        model,
        tokenizer,
        items,
        system_prompt=system_prompt,
        max_length=max_length,
        batch_size=batch_size,
    )
    ranks = []
    for item, own in zip(items, scores, strict=True):
        by_code = dict(zip(item.candidates, own, strict=True))
        reference = by_code[item.record.response]
        others = [score for code, score in by_code.items() if code != item.record.response]
        ranks.append(1 + sum(score >= reference for score in others))
    return ranks


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
    """Score ``gold`` with ``metric``, with 95% bootstrap intervals; also the mean answer loss.

    - ``"code"``: greedy answers; ICD-10-CM exact match and 3-character category match.
    - ``"sentiment"``: greedy answers; rating-class match and adjacent-class match.
    - ``"exact"``, ``"label"``, ``"similarity"``: greedy free-text answers, see
      :data:`fedsilo.evaluation.metrics.METRIC_SCORES`.
    - ``"next-token"``: no generation; teacher-forced top-1 and top-5 next-token accuracy over
      every token of the reference answers (the intervals resample records, tokens pooled).
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
            summary = summarize_next_token(
                scores.top1_hits, scores.top5_hits, sum(scores.tokens), scores.losses
            )
            rates = [
                [hits / max(tokens, 1) for hits, tokens in zip(column, scores.tokens, strict=True)]
                for column in (scores.top1, scores.top5)
            ]
            weights: list[float] | None = [float(tokens) for tokens in scores.tokens]
        else:
            scores, answers = scores_and_answers(
                model,
                tokenizer,
                gold,
                system_prompt=system_prompt,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                batch_size=batch_size,
            )
            references = [record.response for record in gold]
            summary = TEXT_SUMMARIES[metric](answers, references, scores.losses)
            rates = list(RECORD_SCORES[metric](answers, references))
            weights = None
    finally:
        model.train(was_training)
    return dataclasses.replace(
        summary,
        accuracy_ci95=bootstrap_ci(rates[0], weights=weights),
        category_accuracy_ci95=bootstrap_ci(rates[1], weights=weights),
    )


# The name of a task's headline gold part in ``GoldMetrics.parts``.
HEADLINE_PART: dict[str, str] = {"icd10": "unseen-code"}
PHRASING_PART = "phrasing"
RANKING_PART = "ranking"


def ranking_part(ranks: Sequence[int], *, candidates: int) -> PartMetrics:
    """Top-1 and top-5 rates of the reference among ``candidates``, with 95% intervals."""
    figures: PartMetrics = {"count": len(ranks), "candidates": candidates}
    for k in (1, 5):
        hits = [float(rank <= k) for rank in ranks]
        figures[f"top{k}"] = sum(hits) / len(hits)
        figures[f"top{k}_ci95"] = list(bootstrap_ci(hits))
    return figures


def evaluate_task_gold(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskData,
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
) -> GoldMetrics:
    """Every gold part of ``task``: the headline's figures, with all parts in ``parts``.

    The headline (``task.gold``, for ICD-10 unseen codes of trained categories) gives the
    top-level figures; ``task.phrasings`` is scored the same way and ``task.ranking`` by the
    rank of the reference among its candidates (top-1, top-5). Each is reported on its own.
    """

    def score(records: Sequence[ChatRecord]) -> GoldMetrics:
        return evaluate_gold(
            model,
            tokenizer,
            records,
            system_prompt=task.system_prompt,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_length=max_length,
            metric=task.metric,
        )

    headline = score(task.gold)
    parts = {HEADLINE_PART.get(task.name, "gold"): headline.part()}
    if task.phrasings:
        parts[PHRASING_PART] = score(task.phrasings).part()
    if task.ranking:
        was_training = model.training
        model.train(False)
        try:
            ranks = reference_ranks(
                model,
                tokenizer,
                task.ranking,
                system_prompt=task.system_prompt,
                max_length=max_length,
                batch_size=batch_size,
            )
        finally:
            model.train(was_training)
        candidates = max(len(item.candidates) for item in task.ranking)
        parts[RANKING_PART] = ranking_part(ranks, candidates=candidates)
    return dataclasses.replace(headline, parts=parts)

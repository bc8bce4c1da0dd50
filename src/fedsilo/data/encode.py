"""Records to training examples: the chat template, tokenization, loss masks and truncation.

A chat record becomes ``prompt ids + answer ids``. The prompt ids are the chat template applied
to the (system and) user message with the generation prompt, exactly as at inference
(:func:`encode_prompt`); the answer ids are the response's tokens followed by the tokenizer's
eos token, which for chat models is the template's end-of-turn token (``<|im_end|>`` in ChatML).
The loss covers the answer only.

Where the template puts text after the end-of-turn token (ChatML writes ``"\\n"``), that text is
left out: generation stops at eos, so the model never has to produce it, and the next turn's
prompt supplies it. Apart from that tail, ``prompt ids + answer ids`` equals the template's own
tokenization of the full conversation; :func:`encode_records` checks this once per call and
logs a warning for a template where it does not hold.

A text record becomes its tokens followed by eos, with the loss on every token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedsilo.data.records import ChatRecord, DataError, Record, TextRecord

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of a position that carries no loss (the convention of torch and transformers)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example.

    ``labels[t]`` is the token expected at position ``t`` (a causal LM predicts it from the
    positions before ``t``), or :data:`IGNORE_INDEX` where there is no loss. ``truncated`` says
    whether tokens were cut to fit the length limit.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise ValueError("an example needs at least one token")
        if len(self.labels) != len(self.input_ids):
            raise ValueError(
                f"labels ({len(self.labels)}) and input_ids ({len(self.input_ids)}) "
                "must have the same length"
            )

    @property
    def num_targets(self) -> int:
        """Label tokens the loss is computed on (position 0 has nothing to be predicted from)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def prompt_messages(prompt: str, *, system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages for one prompt: an optional system message, then the user's."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    return messages


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    return eos


def _token_ids(encoded: object, *, what: str) -> list[int]:
    """The ids of a single sequence from ``apply_chat_template(tokenize=True)``.

    Depending on the transformers version and arguments, that is a list of ids or a
    ``BatchEncoding`` (a mapping) holding them under ``input_ids``.
    """
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    if not isinstance(ids, list) or not all(isinstance(token, int) for token in ids):
        raise TypeError(f"{what}: expected a list of token ids, got {type(ids).__name__}")
    return ids


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
) -> list[int]:
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return _token_ids(encoded, what="apply_chat_template")


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, system_prompt: str | None
) -> list[int]:
    """Token ids of the chat template up to where the model's answer starts.

    The same ids serve training (:func:`encode_record`) and generation, so a model is asked
    exactly the way it was trained.
    """
    messages = prompt_messages(prompt, system_prompt=system_prompt)
    return _apply_template(tokenizer, messages, add_generation_prompt=True)


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _answer_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    return [*_text_ids(tokenizer, response), _eos_id(tokenizer)]


def _fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt`` from its left, then ``answer`` from its right, to ``max_length`` in all.

    The prompt keeps at least its last token while it has one, so the first answer token is
    still predicted from something and every kept answer token carries loss.
    """
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer
    keep_prompt = min(len(prompt), max(max_length - len(answer), 1))
    keep_answer = min(len(answer), max_length - keep_prompt)
    return prompt[len(prompt) - keep_prompt :], answer[:keep_answer]


def encode_record(
    tokenizer: PreTrainedTokenizerBase,
    record: Record,
    *,
    system_prompt: str | None,
    max_length: int,
) -> Example:
    """Tokenize one record into at most ``max_length`` tokens (see the module docstring).

    A chat record gets labels on the answer only. When too long, the prompt loses tokens from
    its start so the answer survives; an answer that does not fit even so loses its end. A
    text record keeps its start. ``Example.truncated`` reports either cut.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if isinstance(record, ChatRecord):
        prompt = encode_prompt(tokenizer, record.prompt, system_prompt=system_prompt)
        answer = _answer_ids(tokenizer, record.response)
    elif isinstance(record, TextRecord):
        # All of a text record is "answer": it is learned whole.
        prompt = []
        answer = [*_text_ids(tokenizer, record.text), _eos_id(tokenizer)]
    else:
        raise TypeError(f"not a record: {type(record).__name__}")
    kept_prompt, kept_answer = _fit(prompt, answer, max_length)
    return Example(
        input_ids=(*kept_prompt, *kept_answer),
        labels=(IGNORE_INDEX,) * len(kept_prompt) + tuple(kept_answer),
        truncated=len(kept_prompt) + len(kept_answer) < len(prompt) + len(answer),
    )


def template_mismatch(
    tokenizer: PreTrainedTokenizerBase, record: ChatRecord, *, system_prompt: str | None
) -> str | None:
    """Why ``prompt ids + answer ids`` differs from the template's full conversation, or None.

    Only text after the final end-of-turn token is allowed to differ (see the module docstring).
    """
    messages = prompt_messages(record.prompt, system_prompt=system_prompt)
    messages.append({"role": "assistant", "content": record.response})
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    ours = encode_prompt(tokenizer, record.prompt, system_prompt=system_prompt)
    ours += _answer_ids(tokenizer, record.response)
    if full[: len(ours)] != ours:
        return (
            "the chat template's tokens for the full conversation do not start with "
            "prompt + response + eos (does the template end a turn with another token than eos?)"
        )
    tail = str(tokenizer.decode(full[len(ours) :]))
    if tail.strip():
        return f"the chat template adds {tail!r} after the answer's eos token"
    return None


def encode_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    system_prompt: str | None,
    max_length: int,
    source: str,
) -> list[Example]:
    """Encode ``records`` (see :func:`encode_record`), logging what truncation did.

    ``source`` (a site or file name) is named in the logs and errors. Examples left without
    any loss token by truncation are dropped, and their number is logged as a warning; if that
    leaves nothing, :class:`DataError` is raised.
    """
    if not records:
        raise DataError(f"{source}: no records to encode")
    first_chat = next((record for record in records if isinstance(record, ChatRecord)), None)
    if first_chat is not None:
        problem = template_mismatch(tokenizer, first_chat, system_prompt=system_prompt)
        if problem is not None:
            log.warning("%s: training examples may not match inference: %s", source, problem)
    examples: list[Example] = []
    truncated = 0
    dropped = 0
    for record in records:
        example = encode_record(
            tokenizer, record, system_prompt=system_prompt, max_length=max_length
        )
        truncated += example.truncated
        if example.num_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if truncated:
        log.info(
            "%s: %d of %d example(s) truncated to max_length=%d",
            source,
            truncated,
            len(records),
            max_length,
        )
    if dropped:
        log.warning(
            "%s: dropped %d of %d example(s) with no loss token left after truncation "
            "to max_length=%d",
            source,
            dropped,
            len(records),
            max_length,
        )
    if not examples:
        raise DataError(
            f"{source}: all {len(records)} example(s) were dropped: none keeps a loss token "
            f"within max_length={max_length}"
        )
    return examples

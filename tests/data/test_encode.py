"""Chat template, loss masks and truncation of training examples."""

from __future__ import annotations

import copy
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from fedsilo.data.encode import (
    IGNORE_INDEX,
    Example,
    encode_prompt,
    encode_record,
    encode_records,
    prompt_messages,
    template_mismatch,
)
from fedsilo.data.records import ChatRecord, DataError, Record, TextRecord

SYSTEM = "You assign ICD-10-CM codes."
CHAT = ChatRecord(prompt="Acute bronchitis, unspecified", response="J20.9")


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# --- prompts ------------------------------------------------------------------------------------


def test_prompt_messages_put_the_system_message_first() -> None:
    messages = prompt_messages("Q", system_prompt="S")

    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]


def test_prompt_messages_without_system_prompt_hold_only_the_user() -> None:
    assert prompt_messages("Q", system_prompt=None) == [{"role": "user", "content": "Q"}]


def test_encode_prompt_is_the_template_up_to_the_generation_prompt(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = encode_prompt(tokenizer, "Q", system_prompt="S")

    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_prompt_returns_plain_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode_prompt(tokenizer, "Q", system_prompt=None)

    assert isinstance(ids, list)
    assert all(type(token) is int for token in ids)


def test_tokenizer_without_chat_template_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(plain, "Q", system_prompt=None)


# --- chat records -------------------------------------------------------------------------------


def test_chat_labels_mask_exactly_the_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt_ids = encode_prompt(tokenizer, CHAT.prompt, system_prompt=SYSTEM)

    example = encode_record(tokenizer, CHAT, system_prompt=SYSTEM, max_length=512)

    answer = [*_ids(tokenizer, CHAT.response), tokenizer.eos_token_id]
    assert example.input_ids == (*prompt_ids, *answer)
    assert example.labels == (IGNORE_INDEX,) * len(prompt_ids) + tuple(answer)


def test_chat_example_matches_the_templates_full_conversation(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    messages = [
        *prompt_messages(CHAT.prompt, system_prompt=SYSTEM),
        {"role": "assistant", "content": CHAT.response},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)

    example = encode_record(tokenizer, CHAT, system_prompt=SYSTEM, max_length=512)

    # The template's newline after the final <|im_end|> is deliberately not trained on.
    assert list(full) == [*example.input_ids, *_ids(tokenizer, "\n")]


def test_template_mismatch_accepts_chatml(tokenizer: PreTrainedTokenizerFast) -> None:
    assert template_mismatch(tokenizer, CHAT, system_prompt=SYSTEM) is None


def test_template_mismatch_reports_a_turn_end_other_than_eos(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}[END]{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    problem = template_mismatch(other, CHAT, system_prompt=None)

    assert problem is not None
    assert "do not start with prompt + response + eos" in problem


def test_encode_records_warns_when_the_template_disagrees(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "</turn>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    caplog.set_level(logging.WARNING, logger="fedsilo.data.encode")

    encode_records(other, [CHAT], system_prompt=None, max_length=512, source="site A")

    assert any(
        "site A: training examples may not match inference" in message and "</turn>" in message
        for message in caplog.messages
    )


# --- text records -------------------------------------------------------------------------------


def test_text_record_is_its_tokens_then_eos_with_loss_on_all(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    example = encode_record(
        tokenizer, TextRecord(text="Asthma, mild"), system_prompt=SYSTEM, max_length=512
    )

    expected = (*_ids(tokenizer, "Asthma, mild"), tokenizer.eos_token_id)
    assert example.input_ids == expected
    assert example.labels == expected


# --- truncation ---------------------------------------------------------------------------------


def test_short_example_is_not_truncated(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_record(tokenizer, CHAT, system_prompt=SYSTEM, max_length=512)

    assert example.truncated is False


def test_long_prompt_loses_its_start_and_the_answer_survives(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    record = ChatRecord(prompt="history " * 50 + "the question", response="J20.9")
    answer = [*_ids(tokenizer, "J20.9"), tokenizer.eos_token_id]
    prompt_ids = encode_prompt(tokenizer, record.prompt, system_prompt=SYSTEM)

    example = encode_record(tokenizer, record, system_prompt=SYSTEM, max_length=len(answer) + 10)

    assert example.truncated is True
    assert example.input_ids == (*prompt_ids[-10:], *answer)
    assert example.labels == (IGNORE_INDEX,) * 10 + tuple(answer)


def test_answer_too_long_keeps_its_start_after_the_last_prompt_token(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    record = ChatRecord(prompt="Q", response="a long answer that cannot fit")
    prompt_ids = encode_prompt(tokenizer, record.prompt, system_prompt=None)

    example = encode_record(tokenizer, record, system_prompt=None, max_length=6)

    assert example.input_ids == (prompt_ids[-1], *_ids(tokenizer, "a lon"))
    assert example.labels == (IGNORE_INDEX, *_ids(tokenizer, "a lon"))
    assert example.truncated is True


def test_long_text_keeps_its_start(tokenizer: PreTrainedTokenizerFast) -> None:
    example = encode_record(
        tokenizer, TextRecord(text="abcdefghij"), system_prompt=None, max_length=4
    )

    assert example.input_ids == tuple(_ids(tokenizer, "abcd"))
    assert example.truncated is True


def test_max_length_below_one_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        encode_record(tokenizer, CHAT, system_prompt=None, max_length=0)


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(alphabet="abc xyz", min_size=1, max_size=40),
    response=st.text(alphabet="ABC 123", min_size=1, max_size=40),
    max_length=st.integers(min_value=1, max_value=120),
)
def test_truncation_fits_and_keeps_the_answer_when_it_can(
    tokenizer: PreTrainedTokenizerFast, prompt: str, response: str, max_length: int
) -> None:
    record = ChatRecord(prompt=prompt, response=response)
    answer = (*_ids(tokenizer, response), tokenizer.eos_token_id)
    full = encode_record(tokenizer, record, system_prompt=None, max_length=10_000)

    example = encode_record(tokenizer, record, system_prompt=None, max_length=max_length)

    labelled = tuple(label for label in example.labels if label != IGNORE_INDEX)
    assert len(example.input_ids) <= max_length
    assert example.truncated == (len(full.input_ids) > max_length)
    if len(answer) < max_length:
        assert labelled == answer
    else:
        assert labelled == answer[: max_length - 1]


# --- encode_records -----------------------------------------------------------------------------


def test_encode_records_logs_the_truncated_count_with_the_source(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    records = [TextRecord(text="x" * 40), TextRecord(text="short"), TextRecord(text="y" * 50)]
    caplog.set_level(logging.INFO, logger="fedsilo.data.encode")

    examples = encode_records(
        tokenizer, records, system_prompt=None, max_length=20, source="site A"
    )

    assert len(examples) == 3
    assert "site A: 2 of 3 example(s) truncated to max_length=20" in caplog.messages


def test_examples_without_loss_tokens_are_dropped_counted_then_rejected(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    # With one token, nothing precedes it, so no position is a target.
    records: list[Record] = [CHAT, TextRecord(text="text")]
    caplog.set_level(logging.WARNING, logger="fedsilo.data.encode")

    with pytest.raises(DataError, match="site B: all 2 example"):
        encode_records(tokenizer, records, system_prompt=None, max_length=1, source="site B")
    assert any("site B: dropped 2 of 2 example(s)" in message for message in caplog.messages)


def test_encode_records_without_records_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="site C: no records"):
        encode_records(tokenizer, [], system_prompt=None, max_length=8, source="site C")


# --- Example ------------------------------------------------------------------------------------


def test_example_rejects_labels_of_another_length() -> None:
    with pytest.raises(ValueError, match="same length"):
        Example(input_ids=(1, 2), labels=(1,))


def test_example_counts_targets_after_the_first_position() -> None:
    example = Example(input_ids=(5, 6, 7, 8), labels=(5, IGNORE_INDEX, 7, 8))

    assert example.num_targets == 2

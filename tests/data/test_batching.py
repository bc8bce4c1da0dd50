"""Padding, batch sampling and token counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.data.batching import collate, count_label_tokens, count_tokens, iterate_batches
from fedsilo.data.encode import IGNORE_INDEX, Example

PAD = 99


def _examples(count: int) -> list[Example]:
    # Example i holds the single distinctive token i, so a batch can be read back as indices.
    return [Example(input_ids=(index,), labels=(index,)) for index in range(count)]


def _indices(batch: list[Example]) -> list[int]:
    return [example.input_ids[0] for example in batch]


# --- collate ------------------------------------------------------------------------------------


def test_collate_right_pads_to_the_longest_example() -> None:
    examples = [
        Example(input_ids=(1, 2, 3), labels=(IGNORE_INDEX, 2, 3)),
        Example(input_ids=(4,), labels=(4,)),
    ]

    batch = collate(examples, pad_id=PAD)

    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_returns_long_tensors() -> None:
    batch = collate(_examples(2), pad_id=PAD)

    assert {name: tensor.dtype for name, tensor in batch.items()} == {
        "input_ids": torch.long,
        "attention_mask": torch.long,
        "labels": torch.long,
    }


def test_collate_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=PAD)


# --- token counts -------------------------------------------------------------------------------


def test_count_tokens_counts_non_padding() -> None:
    examples = [
        Example(input_ids=(1, 2, 3), labels=(1, 2, 3)),
        Example(input_ids=(4,), labels=(4,)),
    ]

    assert count_tokens(collate(examples, pad_id=PAD)) == 4


def test_count_label_tokens_counts_loss_targets() -> None:
    examples = [
        Example(input_ids=(1, 2, 3, 4), labels=(IGNORE_INDEX, IGNORE_INDEX, 3, 4)),
        Example(input_ids=(5, 6), labels=(5, 6)),
    ]

    # Row 2's first label has no preceding token to be predicted from.
    assert count_label_tokens(collate(examples, pad_id=PAD)) == 3


# --- iterate_batches ----------------------------------------------------------------------------


def test_iterate_batches_yields_exactly_steps_batches() -> None:
    batches = list(
        iterate_batches(_examples(5), batch_size=2, steps=7, generator=np.random.default_rng(0))
    )

    assert len(batches) == 7
    assert all(len(batch) == 2 for batch in batches)


def test_iterate_batches_with_zero_steps_yields_nothing() -> None:
    batches = iterate_batches(
        _examples(3), batch_size=2, steps=0, generator=np.random.default_rng(0)
    )

    assert list(batches) == []


def test_iterate_batches_is_deterministic_for_a_seed() -> None:
    def draw(seed: int) -> list[list[int]]:
        batches = iterate_batches(
            _examples(10), batch_size=3, steps=9, generator=np.random.default_rng(seed)
        )
        return [_indices(batch) for batch in batches]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_iterate_batches_reshuffles_each_epoch() -> None:
    batches = iterate_batches(
        _examples(20), batch_size=20, steps=2, generator=np.random.default_rng(3)
    )

    first, second = (_indices(batch) for batch in batches)
    assert sorted(first) == sorted(second) == list(range(20))
    assert first != second


def test_dataset_smaller_than_batch_gives_whole_epochs() -> None:
    batches = iterate_batches(
        _examples(3), batch_size=8, steps=4, generator=np.random.default_rng(0)
    )

    assert [sorted(_indices(batch)) for batch in batches] == [[0, 1, 2]] * 4


@pytest.mark.parametrize(
    ("count", "batch_size", "steps", "message"),
    [
        (0, 2, 1, "empty dataset"),
        (3, 0, 1, "batch_size must be at least 1"),
        (3, 2, -1, "steps must not be negative"),
    ],
)
def test_iterate_batches_rejects_bad_arguments(
    count: int, batch_size: int, steps: int, message: str
) -> None:
    batches = iterate_batches(
        _examples(count), batch_size=batch_size, steps=steps, generator=np.random.default_rng(0)
    )

    with pytest.raises(ValueError, match=message):
        next(batches)


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=30),
    batch_size=st.integers(min_value=1, max_value=12),
    steps=st.integers(min_value=0, max_value=25),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_every_epoch_is_a_permutation_and_no_batch_repeats_an_example(
    count: int, batch_size: int, steps: int, seed: int
) -> None:
    batches = [
        _indices(batch)
        for batch in iterate_batches(
            _examples(count),
            batch_size=batch_size,
            steps=steps,
            generator=np.random.default_rng(seed),
        )
    ]

    size = min(batch_size, count)
    stream = [index for batch in batches for index in batch]
    epochs = [stream[start : start + count] for start in range(0, len(stream), count)]
    assert len(batches) == steps
    assert all(len(batch) == size and len(set(batch)) == size for batch in batches)
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs if len(epoch) == count)
    assert all(len(set(epoch)) == len(epoch) for epoch in epochs)

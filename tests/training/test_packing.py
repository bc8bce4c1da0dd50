"""Packed micro-batches: the layout, and losses and gradients equal to the padded batch's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, Example, encode_records
from fedsilo.data.packing import (
    pack_with_shared_prefix,
    packed_length,
    packed_rows,
    shared_prefix_length,
)
from fedsilo.data.records import ChatRecord
from fedsilo.training.loss import labelled_token_losses, packed_token_losses

X = IGNORE_INDEX


def _example(ids: list[int], labels: list[int]) -> Example:
    return Example(input_ids=ids, labels=labels, truncated=False)


def test_the_shared_prefix_is_packed_once_and_each_suffix_keeps_its_positions() -> None:
    first = _example([1, 2, 3, 4, 5], [X, X, X, 4, 5])
    second = _example([1, 2, 3, 6, 7, 8], [X, X, X, X, 7, 8])

    packed = pack_with_shared_prefix([first, second])

    # Shared: 1 2 3, but position 2 predicts first's label at 3, so the prefix is 1 2.
    assert packed.prefix == 2
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert packed.segments.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    # Position t predicts its example's label at t + 1; each example's last position, none.
    assert packed.targets.tolist() == [X, X, 4, 5, X, X, 7, 8, X]
    assert (packed.tokens, packed.positions, packed.examples) == (11, 9, 2)


def test_a_suffix_attends_to_the_prefix_and_itself_only() -> None:
    packed = pack_with_shared_prefix(
        [_example([1, 2, 3], [X, X, 3]), _example([1, 2, 4, 5], [X, X, 4, 5])]
    )
    allowed = packed.attention_allowed()

    # Rows are queries: prefix [1] (position 0), first's suffix [2, 3], second's [2, 4, 5].
    assert packed.input_ids.tolist() == [[1, 2, 3, 2, 4, 5]]
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ]


def test_examples_without_a_common_start_are_packed_without_a_prefix() -> None:
    examples = [_example([1, 2], [X, 2]), _example([3, 4, 5], [X, 4, 5])]

    assert shared_prefix_length(examples) == 0
    assert pack_with_shared_prefix(examples).input_ids.tolist() == [[1, 2, 3, 4, 5]]


def test_rows_hold_at_most_the_position_budget_and_every_example_once() -> None:
    examples = [_example([1, 2, 3, *[9] * n], [X, X, X, *[9] * n]) for n in (1, 2, 3, 4, 20)]

    rows = list(packed_rows(examples, max_positions=10))

    # Prefix [1, 2] (the third token precedes a label) once per row; the 23-token example
    # exceeds the budget alone.
    assert [row.examples for row in rows] == [2, 1, 1, 1]
    assert [row.positions for row in rows] == [2 + 2 + 3, 2 + 4, 2 + 5, 23]
    assert all(row.positions <= 10 for row in rows[:-1])
    assert sum(row.tokens for row in rows) == sum(len(e.input_ids) for e in examples)
    assert [packed_length(examples[:2])] == [rows[0].positions]


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        pack_with_shared_prefix([])


def test_packed_losses_and_gradients_equal_the_padded_batch(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())
    model = loaded.model
    with torch.no_grad():  # non-zero B, so every LoRA matrix has a gradient
        generator = torch.Generator().manual_seed(5)
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    # A system prompt shared by all, answers and questions of different lengths.
    records = [
        ChatRecord(prompt="code for " + "x" * (i % 4), response="A" * (i + 1) + ".9")
        for i in range(5)
    ]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt="Answer with a code.", max_length=128, source="t"
    )
    params = [param for param in model.parameters() if param.requires_grad]
    model.train()

    def losses_and_grads(packed: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if packed:
            batch = pack_with_shared_prefix(examples)
            assert batch.prefix > 5
            token_losses = packed_token_losses(model, batch)
        else:
            token_losses = labelled_token_losses(model, collate(examples, pad_id=0))
        token_losses.losses.sum().backward()
        grads = [param.grad.detach().clone() for param in params if param.grad is not None]
        return token_losses.losses.detach(), token_losses.per_example_mean().detach(), grads

    padded_losses, padded_means, padded_grads = losses_and_grads(packed=False)
    packed_losses, packed_means, packed_grads = losses_and_grads(packed=True)

    assert len(packed_grads) == len(padded_grads) == len(params)
    torch.testing.assert_close(packed_losses, padded_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_means, padded_means, rtol=1e-5, atol=1e-6)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)

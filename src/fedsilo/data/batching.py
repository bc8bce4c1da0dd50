"""Batches of training examples: sampling order, padding, and token counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedsilo.data.encode import IGNORE_INDEX, Example


def collate(examples: Sequence[Example], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into ``input_ids``, ``attention_mask`` and ``labels`` (all long).

    Padding gets ``pad_id`` in ``input_ids``, 0 in ``attention_mask`` and :data:`IGNORE_INDEX`
    in ``labels``, so it carries no loss.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    steps: int,
    generator: np.random.Generator,
) -> Iterator[list[Example]]:
    """Yield exactly ``steps`` batches, each epoch a fresh permutation drawn from ``generator``.

    The index stream is a concatenation of permutations, so within an epoch every example is
    used once. A batch never holds an example twice: one that crosses an epoch boundary takes
    the rest of the old epoch and then the first examples of the new epoch that it does not
    already hold (those move to the end of the new epoch). With fewer examples than
    ``batch_size``, each batch is one whole epoch. The same generator state gives the same
    batches.
    """
    if not examples:
        raise ValueError("cannot draw batches from an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must not be negative, got {steps}")
    size = min(batch_size, len(examples))
    order: list[int] = []  # the current epoch's indices; order[position:] are not used yet
    position = 0
    for _ in range(steps):
        if len(order) - position < size:
            rest = order[position:]
            in_batch = set(rest)
            fresh = [int(index) for index in generator.permutation(len(examples))]
            order = rest + [index for index in fresh if index not in in_batch]
            order += [index for index in fresh if index in in_batch]
            position = 0
        yield [examples[index] for index in order[position : position + size]]
        position += size


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (the attention mask's ones)."""
    return int(batch["attention_mask"].sum())


def count_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions the model computes, padding included (rows times the padded width)."""
    return int(batch["input_ids"].numel())


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on: labelled positions after the first of each row.

    A causal LM predicts position ``t`` from the positions before it, so a label at position 0
    is never a target (see :attr:`Example.num_targets`).
    """
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

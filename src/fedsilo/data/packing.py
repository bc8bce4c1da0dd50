"""Examples packed into one sequence, their common prompt prefix computed once.

Chat examples of one task start alike: for ICD-10 coding 37 of about 62 tokens (template,
system prompt, the start of the user turn) are the same in every example, and only the last
few carry loss. Packing a micro-batch as ``prefix + suffix_1 + suffix_2 + ...`` in one row,
with an attention mask that lets each suffix see the prefix and itself (causally) and nothing
else, and with each example's own position ids, computes the shared prefix once and no
padding at all. Every labelled position is in a suffix, and sees exactly the tokens it sees
in its own padded row, so the losses and their gradients are those of the padded batch (the
tests check it): the gradient that each example sends back into the prefix is summed there,
as autograd would sum it over the batch's copies of the prefix.

Record-level DP-SGD keeps one row per example: per-example gradients need each example's
prefix computed with its own weight copy (:mod:`fedsilo.model.lora_forward`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fedsilo.data.encode import IGNORE_INDEX, Example


@dataclass(frozen=True)
class PackedBatch:
    """A micro-batch as one packed row (see the module docstring)."""

    input_ids: torch.Tensor  # (1, positions) long
    position_ids: torch.Tensor  # (1, positions) long: each token's position in its example
    segments: torch.Tensor  # (positions,) long: 0 for the shared prefix, i + 1 for example i
    targets: torch.Tensor  # (positions,) long: the label position t predicts, or IGNORE_INDEX
    prefix: int  # tokens of the shared prefix
    examples: int
    tokens: int  # the examples' own tokens (the shared prefix counts once for each)

    @property
    def positions(self) -> int:
        """Positions the model computes."""
        return int(self.input_ids.shape[1])

    def attention_allowed(self) -> torch.Tensor:
        """(positions, positions) bool: whether query position q may attend to key position k.

        Causal, and within one example: the prefix sees the prefix; example i's suffix sees
        the prefix and its own earlier tokens.
        """
        index = torch.arange(self.positions)
        causal = index[None, :] <= index[:, None]
        key_segment, query_segment = self.segments[None, :], self.segments[:, None]
        return causal & ((key_segment == 0) | (key_segment == query_segment))


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every one of ``sequences`` (at least one) has in common."""
    first = sequences[0]
    common = min(len(sequence) for sequence in sequences)
    for sequence in sequences[1:]:
        common = next((t for t in range(common) if sequence[t] != first[t]), common)
    return common


def shared_prefix_length(examples: Sequence[Example]) -> int:
    """The longest prefix every example shares that ends before the first position whose
    hidden state carries loss (position t carries the loss of the label at t + 1)."""
    common = common_prefix_length([example.input_ids for example in examples])
    first_target = min(
        next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)
        for example in examples
    )
    return max(0, min(common, first_target - 1))


def packed_length(examples: Sequence[Example]) -> int:
    """Positions :func:`pack_with_shared_prefix` gives ``examples``."""
    prefix = shared_prefix_length(examples)
    return prefix + sum(len(example.input_ids) - prefix for example in examples)


def packed_rows(examples: Sequence[Example], *, max_positions: int) -> Iterator[PackedBatch]:
    """``examples``, in order, packed into rows of at most ``max_positions`` positions each (an
    example longer than that gets a row of its own)."""
    group: list[Example] = []
    for example in examples:
        if group and packed_length([*group, example]) > max_positions:
            yield pack_with_shared_prefix(group)
            group = []
        group.append(example)
    if group:
        yield pack_with_shared_prefix(group)


def pack_with_shared_prefix(examples: Sequence[Example]) -> PackedBatch:
    """Pack ``examples`` into one row, their shared prefix once; suffixes in the given order."""
    if not examples:
        raise ValueError("cannot pack an empty batch")
    prefix = shared_prefix_length(examples)
    input_ids = list(examples[0].input_ids[:prefix])
    positions = list(range(prefix))
    segments = [0] * prefix
    targets = [IGNORE_INDEX] * prefix
    for number, example in enumerate(examples, start=1):
        length = len(example.input_ids)
        if length <= prefix:
            raise ValueError(f"example {number - 1} has no token after the shared prefix")
        input_ids += example.input_ids[prefix:]
        positions += range(prefix, length)
        segments += [number] * (length - prefix)
        # Position t of the example predicts its label at t + 1; its last position, none.
        targets += [*example.labels[prefix + 1 :], IGNORE_INDEX]
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        segments=torch.tensor(segments, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        prefix=prefix,
        examples=len(examples),
        tokens=sum(len(example.input_ids) for example in examples),
    )

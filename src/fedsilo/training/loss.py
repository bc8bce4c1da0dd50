"""The training loss of a causal LM, computed only where a label is set.

In an instruction example most tokens are prompt; only the answer carries loss (about 5 of
60 tokens for ICD-10 coding). The vocabulary projection (49,152 x 576 for SmolLM2) and the
cross-entropy are therefore run only on the hidden states of positions whose next token is a
label: the same values as the full logits at those positions, at a fraction of the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from fedsilo.data.encode import IGNORE_INDEX
from fedsilo.data.packing import PackedBatch
from fedsilo.training.device import model_device, on_device


@dataclass(frozen=True)
class TokenLosses:
    """Cross-entropy of every labelled target in a batch, and the row each belongs to."""

    losses: torch.Tensor  # (targets,) fp32
    rows: torch.Tensor  # (targets,) long: the batch row of each target
    batch_rows: int

    def per_example_mean(self) -> torch.Tensor:
        """Each row's mean token loss, shape (batch_rows,); rows without a target get 0."""
        totals = torch.zeros(self.batch_rows, dtype=self.losses.dtype, device=self.losses.device)
        totals = totals.index_add(0, self.rows, self.losses)
        counts = torch.bincount(self.rows, minlength=self.batch_rows).clamp(min=1)
        return totals / counts.to(totals.dtype)

    def token_mean(self) -> torch.Tensor:
        """The mean over every labelled token of the batch (Hugging Face's causal-LM loss)."""
        return self.losses.mean()


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the vocabulary projection of a (peft-wrapped) causal LM."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = cast(nn.Module, get_base())
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        raise TypeError(f"{type(inner).__name__} is not a causal LM with a decoder and an LM head")
    decoder, head = get_decoder(), get_head()
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(f"{type(inner).__name__} has no decoder or LM head module")
    return decoder, head


def labelled_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLosses:
    """Cross-entropy of each labelled target, with the LM head run only where it is needed.

    Position ``t`` predicts the label at ``t + 1``; a label of :data:`IGNORE_INDEX` (prompt,
    padding) is not a target. The loss is computed from fp32 logits whatever the precision.
    The batch is moved to the model's device.
    """
    decoder, head = decoder_and_head(model)
    batch = on_device(batch, model_device(model))
    # No KV cache: training never reuses one, and building it copies every layer's keys and
    # values (models default to use_cache=True for generation).
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    # Boolean indexing copies the selected rows into one contiguous block, which the LM head's
    # matrix multiply needs to run at full speed.
    selected = hidden[:, :-1][scored]
    logits = head(selected).float()
    losses = nn.functional.cross_entropy(logits, targets[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    return TokenLosses(losses=losses, rows=rows, batch_rows=int(targets.shape[0]))


def additive_attention_mask(decoder: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A custom attention rule as the decoder takes it: ``allowed`` (rows, queries, keys) bool
    becomes a (rows, 1, queries, keys) additive mask, 0 where a query may attend and the
    dtype's minimum where not, in the dtype the decoder's hidden states start in (Hugging Face
    adds masks in it)."""
    embeddings = getattr(decoder, "embed_tokens", None)
    dtype = embeddings.weight.dtype if isinstance(embeddings, nn.Embedding) else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_token_losses(model: nn.Module, packed: PackedBatch) -> TokenLosses:
    """:func:`labelled_token_losses` of a packed micro-batch (:mod:`fedsilo.data.packing`).

    The packing's attention rule goes to the decoder as a 4D additive mask (0 where a query may
    attend, the dtype's minimum where not) in the embeddings' dtype, with each token's own
    position id. ``rows`` are the examples' indices, so :meth:`TokenLosses.per_example_mean`
    means the same as for a padded batch.
    """
    decoder, head = decoder_and_head(model)
    device = model_device(model)
    mask = additive_attention_mask(decoder, packed.attention_allowed()[None])
    hidden = decoder(
        input_ids=packed.input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=packed.position_ids.to(device),
        use_cache=False,
    ).last_hidden_state[0]
    targets = packed.targets.to(device)
    scored = targets != IGNORE_INDEX
    logits = head(hidden[scored]).float()
    losses = nn.functional.cross_entropy(logits, targets[scored], reduction="none")
    rows = packed.segments.to(device)[scored] - 1
    return TokenLosses(losses=losses, rows=rows, batch_rows=packed.examples)

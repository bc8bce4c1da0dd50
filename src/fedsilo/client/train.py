"""Local training at one site: a plain LoRA fine-tuning loop, read top to bottom.

The site starts from the global adapter, runs a fixed number of optimizer steps on its own
examples and returns only the change to the adapter (never data, never per-example values).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedsilo.data.batching import collate, count_tokens, iterate_batches
from fedsilo.data.encode import Example
from fedsilo.model.adapters import AdapterState, get_adapter_state, set_adapter_state


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one site's local round produced."""

    delta: AdapterState  # trained adapter minus the global adapter it started from
    num_examples: int  # size of the site's training set (the FedAvg weight)
    train_loss: float  # mean task loss over the local steps (without the proximal term)
    tokens: int  # non-padding tokens processed
    seconds: float


def proximal_term(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], *, mu: float
) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the trainable adapter tensors."""
    total = torch.zeros((), dtype=torch.float32)
    for param, anchor in zip(params, anchors, strict=True):
        total = total + torch.sum((param - anchor) ** 2)
    return 0.5 * mu * total


def train_local(
    model: PeftModel,
    examples: Sequence[Example],
    *,
    global_state: AdapterState,
    steps: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float,
    max_grad_norm: float | None,
    pad_id: int,
    seed: int,
) -> LocalTrainingResult:
    """Train the adapter for ``steps`` batches from ``global_state``; return the update."""
    if not examples:
        raise ValueError("a site cannot train on an empty dataset")
    started = time.perf_counter()
    set_adapter_state(model, global_state)
    model.train()
    params = [param for param in model.parameters() if param.requires_grad]
    # The proximal term pulls towards the weights the round started from; keep a frozen copy.
    anchors = [param.detach().clone() for param in params] if proximal_mu > 0 else []
    # A fresh optimizer each round: its moments describe the last round's global model,
    # which the aggregation has just replaced.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = np.random.default_rng(seed)

    losses: list[float] = []
    tokens = 0
    for batch_examples in iterate_batches(
        examples, batch_size=batch_size, steps=steps, generator=generator
    ):
        batch = collate(batch_examples, pad_id=pad_id)
        tokens += count_tokens(batch)
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        if proximal_mu > 0:
            loss = loss + proximal_term(params, anchors, mu=proximal_mu)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.eval()
    trained = get_adapter_state(model)
    delta = {name: trained[name] - global_state[name] for name in global_state}
    return LocalTrainingResult(
        delta=delta,
        num_examples=len(examples),
        train_loss=float(np.mean(losses)),
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )

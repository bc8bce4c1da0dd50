"""The one local-training loop of a site, read top to bottom.

Plain training, FedProx, FFA-LoRA and record-level DP-SGD all run through
:func:`train_local`. What differs between them is one step's gradient, so that is the
pluggable part (:class:`GradientMethod`): how batches are drawn and how a batch becomes the
gradient left in each ``param.grad``. Everything else is written once: the adapter starts from
the global state, FedProx's pull is added, the optimizer steps, and the site returns only the
change to the adapter (never data, never per-example values).

The compute precision follows the model: when its frozen base weights are held in bf16
(:func:`fedsilo.training.precision.hold_base_weights_in`) the forward passes run under bf16
autocast; LoRA parameters, gradients and optimizer state are fp32 either way. So does the
device: batches go to wherever the model is (:mod:`fedsilo.training.device`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedsilo.data.batching import iterate_batches
from fedsilo.data.encode import Example
from fedsilo.data.packing import packed_rows
from fedsilo.model.adapters import AdapterState, get_adapter_state, set_adapter_state
from fedsilo.training.compilation import compiled_training
from fedsilo.training.device import (
    CPU_PACKED_POSITIONS,
    CPU_PLAIN_MICRO_BATCH,
    model_device,
    packed_positions,
    plain_micro_batch_size,
)
from fedsilo.training.loss import packed_token_losses
from fedsilo.training.precision import Precision, base_weights_precision, forward_in

OptimizerName = Literal["adamw", "sgd"]
"""The optimizer that turns a step's gradient into an update."""

_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}


@dataclass(frozen=True)
class StepOutcome:
    """What one step's gradient computation processed."""

    loss: float | None  # the batch's loss (None: an empty DP batch, noise only)
    tokens: int  # the batch's examples' tokens (a prefix they share counts for each)
    positions: int  # positions the model computed, padding included
    padding: int  # of which padding


@dataclass(frozen=True)
class StepProgress:
    """Where a local round stands, after a step (for progress displays)."""

    step: int  # steps done, from 1
    steps: int
    tokens: int  # the examples' tokens so far (as LocalTrainingResult.tokens)
    seconds: float  # since the round's training started
    loss: float | None  # this step's batch loss (None: an empty DP batch)
    positions: int = 0  # positions the model computed so far (as LocalTrainingResult.positions)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class GradientMethod(Protocol):
    """How a step's gradient is made from the site's examples: the pluggable part of the loop."""

    def batches(
        self, examples: Sequence[Example], *, steps: int, generator: np.random.Generator
    ) -> Iterator[list[Example]]:
        """The ``steps`` batches of a local round, drawn with ``generator``."""
        ...

    def attached(self, model: nn.Module) -> AbstractContextManager[None]:
        """Whatever must be attached to ``model`` while the steps run (e.g. per-example hooks)."""
        ...

    def set_gradients(
        self,
        model: nn.Module,
        batch: Sequence[Example],
        *,
        params: Sequence[nn.Parameter],
        pad_id: int,
        precision: Precision,
    ) -> StepOutcome:
        """Leave in each ``param.grad`` the step's (fp32) gradient of the data term."""
        ...


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one site's local round produced."""

    delta: AdapterState  # trained adapter minus the global adapter it started from
    num_examples: int  # size of the site's training set (the FedAvg weight)
    train_loss: float  # mean batch loss over the steps (without the proximal term); NaN if none
    tokens: int  # tokens of the examples trained on (a shared prefix counts for each)
    positions: int  # positions the model computed (padding included, shared prefixes once)
    padding_share: float  # share of the computed positions that were padding
    seconds: float
    precision: Precision


def micro_batches(batch: Sequence[Example], *, size: int) -> Iterator[list[Example]]:
    """``batch`` sorted by length and cut into pieces of at most ``size`` (less padding)."""
    ordered = sorted(batch, key=lambda example: len(example.input_ids))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


# Examples per forward pass in plain training on the CPU (see fedsilo.training.device; a GPU
# takes the whole batch at once).
DEFAULT_PLAIN_MICRO_BATCH = CPU_PLAIN_MICRO_BATCH


@dataclass(frozen=True)
class PlainGradient:
    """Non-private training: the token-mean loss of a shuffled batch.

    The batch's gradient is accumulated over micro-batches of at most ``micro_batch_size``
    examples of similar length (bounded memory), each weighted by its share of the batch's
    loss tokens, so the result is exactly the gradient of the whole batch's token mean. Each
    micro-batch runs packed, its shared prompt prefix computed once and no padding
    (:mod:`fedsilo.data.packing`), in rows of at most ``max_packed_positions``.
    ``max_grad_norm`` clips that gradient (over all adapter parameters together) when set.
    The decoder layers run compiled when the model was prepared for it
    (:mod:`fedsilo.training.compilation`).
    """

    batch_size: int
    max_grad_norm: float | None = None
    micro_batch_size: int = DEFAULT_PLAIN_MICRO_BATCH
    max_packed_positions: int = CPU_PACKED_POSITIONS

    def batches(
        self, examples: Sequence[Example], *, steps: int, generator: np.random.Generator
    ) -> Iterator[list[Example]]:
        return iterate_batches(
            examples, batch_size=self.batch_size, steps=steps, generator=generator
        )

    def attached(self, model: nn.Module) -> AbstractContextManager[None]:
        # Compiled decoder layers where the model was prepared for it (training.compilation).
        return compiled_training(model)

    def set_gradients(
        self,
        model: nn.Module,
        batch: Sequence[Example],
        *,
        params: Sequence[nn.Parameter],
        pad_id: int,
        precision: Precision,
    ) -> StepOutcome:
        targets = sum(example.num_targets for example in batch)
        if targets == 0:
            raise ValueError("a training batch has no loss token")
        loss_sum = 0.0
        tokens = positions = 0
        for piece in micro_batches(batch, size=self.micro_batch_size):
            for packed in packed_rows(piece, max_positions=self.max_packed_positions):
                tokens += packed.tokens
                positions += packed.positions
                with forward_in(model, precision):
                    token_losses = packed_token_losses(model, packed)
                row_sum = token_losses.losses.sum()
                torch.autograd.backward(row_sum / targets)
                loss_sum += float(row_sum.detach())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return StepOutcome(loss=loss_sum / targets, tokens=tokens, positions=positions, padding=0)


def train_local(
    model: PeftModel,
    examples: Sequence[Example],
    *,
    method: GradientMethod,
    global_state: AdapterState,
    steps: int,
    learning_rate: float,
    proximal_mu: float,
    pad_id: int,
    seed: int,
    optimizer: OptimizerName = "adamw",
    on_step: Callable[[StepProgress], None] | None = None,
) -> LocalTrainingResult:
    """Train the adapter for ``steps`` steps of ``method`` from ``global_state``; return the update.

    FedProx's proximal term depends only on the weights and on the global adapter, never on a
    record, so its gradient ``mu * (w - w_global)`` is added after the method's gradient (for
    DP-SGD: after clipping and noise, at no privacy cost). ``seed`` draws the batches.
    """
    if not examples:
        raise ValueError("a site cannot train on an empty dataset")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    started = time.perf_counter()
    precision = base_weights_precision(model)
    set_adapter_state(model, global_state)
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError("the model has no trainable adapter parameters")
    # The proximal term pulls towards the weights the round started from; keep a frozen copy.
    anchors = [param.detach().clone() for param in params] if proximal_mu > 0 else []
    # A fresh optimizer each round: its moments describe the last round's global model,
    # which the aggregation has just replaced.
    step_optimizer = _OPTIMIZERS[optimizer](params, learning_rate)
    generator = np.random.default_rng(seed)

    losses: list[float] = []
    tokens = positions = padding = 0
    was_training = model.training
    try:
        with method.attached(model):
            model.train()
            batches = method.batches(examples, steps=steps, generator=generator)
            for step, batch in enumerate(batches, start=1):
                outcome = method.set_gradients(
                    model, batch, params=params, pad_id=pad_id, precision=precision
                )
                if proximal_mu > 0:
                    with torch.no_grad():
                        for param, anchor in zip(params, anchors, strict=True):
                            pull = proximal_mu * (param - anchor)
                            param.grad = pull if param.grad is None else param.grad + pull
                step_optimizer.step()
                # Flush gradients now: the next batch's activations need the memory.
                step_optimizer.zero_grad(set_to_none=True)
                if outcome.loss is not None:
                    losses.append(outcome.loss)
                tokens += outcome.tokens
                positions += outcome.positions
                padding += outcome.padding
                if on_step is not None:
                    on_step(
                        StepProgress(
                            step,
                            steps,
                            tokens,
                            time.perf_counter() - started,
                            outcome.loss,
                            positions,
                        )
                    )
    finally:
        for param in params:
            param.grad = None
        model.train(was_training)

    trained = get_adapter_state(model)
    delta = {name: trained[name] - global_state[name] for name in global_state}
    return LocalTrainingResult(
        delta=delta,
        num_examples=len(examples),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        tokens=tokens,
        positions=positions,
        padding_share=padding / positions if positions else 0.0,
        seconds=time.perf_counter() - started,
        precision=precision,
    )


def train_plain(
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
    on_step: Callable[[StepProgress], None] | None = None,
) -> LocalTrainingResult:
    """:func:`train_local` with :class:`PlainGradient` (non-private training, FedProx, FFA-LoRA).

    Micro-batches of :data:`DEFAULT_PLAIN_MICRO_BATCH` on the CPU, the whole batch on a GPU;
    packed rows as long as :func:`fedsilo.training.device.packed_positions` allows.
    """
    device = model_device(model)
    micro_batch = plain_micro_batch_size(device, batch_size)
    return train_local(
        model,
        examples,
        method=PlainGradient(
            batch_size=batch_size,
            max_grad_norm=max_grad_norm,
            micro_batch_size=micro_batch,
            max_packed_positions=packed_positions(device),
        ),
        global_state=global_state,
        steps=steps,
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
        pad_id=pad_id,
        seed=seed,
        on_step=on_step,
    )

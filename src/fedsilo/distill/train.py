"""Training the master: the experts' soft labels once, then a plain KL loop on the student.

The experts and the student share one base model and LoRA shape, so one PEFT model serves
all of them: an expert's tensors are copied into the adapter to compute its soft labels, then
the student's fresh adapter is put in their place and trained. Soft labels (the teacher's
logits at every answer position) are computed once per transfer example, by the expert the
router picks for it; the student then learns from them with :func:`distillation_kl`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from peft import PeftModel

from fedsilo.data.batching import collate
from fedsilo.data.encode import IGNORE_INDEX, Example
from fedsilo.distill.loss import distillation_kl
from fedsilo.model.adapters import AdapterState, get_adapter_state, set_adapter_state

RouterName = Literal["label", "best-expert"]


@dataclass(frozen=True)
class SoftLabels:
    """Per transfer example: the routed expert's name and its logits at the answer positions."""

    experts: tuple[str, ...]
    logits: tuple[torch.Tensor, ...]  # example i: (answer positions of i, vocab), float32


@dataclass(frozen=True)
class StudentResult:
    """What training the student produced."""

    adapter: AdapterState
    losses: tuple[float, ...]  # the distillation loss of every step
    tokens: int  # answer positions trained on, over all steps
    seconds: float


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict answer tokens, row by row: ``(positions, vocab)``.

    Position ``t`` predicts token ``t + 1``, so the logits at ``t`` count when ``labels[t + 1]``
    is an answer token.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask]


def _answer_targets(labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    return targets[targets != IGNORE_INDEX]


@torch.no_grad()
def _expert_logits(
    model: PeftModel, examples: Sequence[Example], *, batch_size: int, pad_id: int
) -> list[torch.Tensor]:
    was_training = model.training
    model.train(False)
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_id=pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            for row in range(len(chunk)):
                labels = batch["labels"][row : row + 1]
                out.append(answer_logits(logits[row : row + 1], labels).float().clone())
    finally:
        model.train(was_training)
    return out


def soft_labels(
    model: PeftModel,
    examples: Sequence[Example],
    experts: Mapping[str, AdapterState],
    *,
    router: RouterName,
    labels: Sequence[str | None],
    batch_size: int,
    pad_id: int,
) -> SoftLabels:
    """Each example's teacher logits, from the expert ``router`` picks.

    "label": the expert named in ``labels`` (ValueError naming the example if it is missing
    or unknown). "best-expert": every expert scores the example's answer and the one with the
    lowest cross-entropy teaches it (ties: the first name in sorted order).
    """
    names = sorted(experts)
    if router == "label":
        for index, label in enumerate(labels):
            if label not in experts:
                raise ValueError(
                    f"transfer record {index + 1}: expert {label!r} is not one of {names} "
                    '(the "label" router needs every record to name its expert)'
                )
        chosen: list[str] = [str(label) for label in labels]
        logits: list[torch.Tensor | None] = [None] * len(examples)
        for name in names:
            mine = [i for i, label in enumerate(chosen) if label == name]
            if not mine:
                continue
            set_adapter_state(model, experts[name])
            computed = _expert_logits(
                model, [examples[i] for i in mine], batch_size=batch_size, pad_id=pad_id
            )
            for i, value in zip(mine, computed, strict=True):
                logits[i] = value
        return SoftLabels(tuple(chosen), tuple(_present(logits)))
    best: list[tuple[float, str, torch.Tensor]] = []
    for name in names:
        set_adapter_state(model, experts[name])
        computed = _expert_logits(model, examples, batch_size=batch_size, pad_id=pad_id)
        for i, value in enumerate(computed):
            targets = _answer_targets(collate([examples[i]], pad_id=pad_id)["labels"])
            loss = float(torch.nn.functional.cross_entropy(value, targets))
            if len(best) <= i:
                best.append((loss, name, value))
            elif loss < best[i][0]:
                best[i] = (loss, name, value)
    return SoftLabels(tuple(b[1] for b in best), tuple(b[2] for b in best))


def _present(values: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    out = []
    for index, value in enumerate(values):
        if value is None:
            raise AssertionError(f"transfer example {index} got no soft label")
        out.append(value)
    return out


def _batch_kl(
    model: PeftModel,
    examples: Sequence[Example],
    teachers: SoftLabels,
    indices: Sequence[int],
    *,
    temperature: float,
    pad_id: int,
) -> tuple[torch.Tensor, int]:
    batch = collate([examples[i] for i in indices], pad_id=pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student = answer_logits(logits, batch["labels"])
    teacher = torch.cat([teachers.logits[i] for i in indices])
    return distillation_kl(student, teacher, temperature=temperature), int(student.shape[0])


@torch.no_grad()
def mean_kl(
    model: PeftModel,
    examples: Sequence[Example],
    teachers: SoftLabels,
    *,
    temperature: float,
    batch_size: int,
    pad_id: int,
) -> float:
    """The distillation loss over the whole transfer set, weighted by answer positions."""
    was_training = model.training
    model.train(False)
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            indices = range(start, min(start + batch_size, len(examples)))
            loss, positions = _batch_kl(
                model, examples, teachers, indices, temperature=temperature, pad_id=pad_id
            )
            total += float(loss) * positions
            count += positions
    finally:
        model.train(was_training)
    return total / count


def train_student(
    model: PeftModel,
    examples: Sequence[Example],
    teachers: SoftLabels,
    *,
    initial: AdapterState,
    steps: int,
    batch_size: int,
    learning_rate: float,
    temperature: float,
    max_grad_norm: float | None,
    pad_id: int,
    seed: int,
) -> StudentResult:
    """``steps`` AdamW steps of the student adapter (from ``initial``) on the KL loss."""
    if not examples:
        raise ValueError("cannot distill on an empty transfer set")
    started = time.perf_counter()
    set_adapter_state(model, initial)
    model.train()
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(examples))
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    for _ in range(steps):
        # Epochs of fresh permutations: every example once per epoch.
        if len(order) < size:
            order += [int(i) for i in rng.permutation(len(examples))]
        indices, order = order[:size], order[size:]
        loss, positions = _batch_kl(
            model, examples, teachers, indices, temperature=temperature, pad_id=pad_id
        )
        tokens += positions
        losses.append(float(loss.detach()))
        torch.autograd.backward(loss)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return StudentResult(
        adapter=get_adapter_state(model),
        losses=tuple(losses),
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )

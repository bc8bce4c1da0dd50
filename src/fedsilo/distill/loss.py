"""The distillation loss: temperature-scaled KL between next-token distributions.

For one answer position with teacher logits ``t`` and student logits ``s`` over the vocabulary,
and temperature ``T``::

    p = softmax(t / T)            q = softmax(s / T)
    KL(p || q) = sum_v p_v * (log p_v - log q_v)

The loss is ``T**2`` times the mean of that KL over all answer positions of the batch. The
``T**2`` factor (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") keeps the
gradient's size independent of ``T``, since softening by ``T`` scales it by ``1 / T**2``.
"""

from __future__ import annotations

import torch


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T**2 * mean KL(softmax(teacher / T) || softmax(student / T))`` over positions.

    Logits have shape ``(..., vocab)``; ``mask`` (shape ``(...)``, bool) selects the positions
    that count, all of them when None. Computed in float32 (float64 inputs stay float64).
    Raises ValueError for a non-positive temperature, mismatched shapes or no position.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_position = torch.sum(teacher.exp() * (teacher - student), dim=-1)
    if mask is None:
        mask = torch.ones(per_position.shape, dtype=torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match positions {tuple(per_position.shape)}"
        )
    counted = int(mask.sum())
    if counted == 0:
        raise ValueError("no position to compute the distillation loss on")
    return temperature**2 * per_position[mask].sum() / counted

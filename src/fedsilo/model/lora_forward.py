"""fedsilo's forward for peft's LoRA linear layers: rank-scaled, and per-example when asked.

Rank-scaled: peft computes ``base(x) + B(A(x)) * scaling``, so the multiplication runs on the
layer's whole output (tokens x out_features) and again in the backward pass.
``base(x) + B(A(x) * scaling)`` is the same function and the same gradients, with the
multiplication on a tokens x r tensor.

Per-example (record-level DP-SGD, :class:`PerExampleLora`): DP-SGD needs each example's own
gradient of the LoRA weights. Inside :func:`per_example_lora` a layer whose A or B weight is
trained multiplies example ``i`` of the batch by row ``i`` of a per-example copy of that
weight: a leaf tensor of shape ``(batch, *weight.shape)`` that is the weight broadcast along
the batch (no copy in memory). The forward values are unchanged; after ``backward`` the leaf's
``.grad`` holds row ``i`` = the gradient of example ``i``'s loss, computed by autograd's own
batched matrix products (the same FLOPs as the shared weight's gradient, kept apart per
example instead of summed). Unlike per-sample gradient hooks, nothing runs outside the
forward and backward graphs, so the layers compile (:mod:`fedsilo.training.compilation`).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

# Attributes of a LoRA layer that hold the per-example copies of its A and B weights for the
# current batch (absent or None: the layer's own weight, shared by the batch).
_EXAMPLE_A = "_fedsilo_example_a"
_EXAMPLE_B = "_fedsilo_example_b"


def _rank_scaled_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    active = self.active_adapters
    example_a: torch.Tensor | None = getattr(self, _EXAMPLE_A, None)
    example_b: torch.Tensor | None = getattr(self, _EXAMPLE_B, None)
    plain = (
        not args
        and not kwargs
        and not self.disable_adapters
        and not self.merged
        and len(active) == 1
        and active[0] in self.lora_A
        and active[0] not in self.lora_variant
    )
    if not plain:  # merged, disabled, mixed batches, several adapters, DoRA: peft's own path
        if example_a is not None or example_b is not None:
            raise RuntimeError(
                "per-example LoRA gradients need a single active, unmerged plain LoRA adapter"
            )
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    lora_a = cast(nn.Linear, self.lora_A[name])
    lora_x = self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))
    # (batch, tokens, in) @ (batch, in, r): example i meets row i of the per-example weight.
    hidden = lora_a(lora_x) if example_a is None else lora_x @ example_a.mT
    hidden = hidden * self.scaling[name]
    update = self.lora_B[name](hidden) if example_b is None else hidden @ example_b.mT
    return (result + update).to(result.dtype)


def use_rank_scaled_forward(model: nn.Module) -> None:
    """Give every peft LoRA linear layer of ``model`` the rank-scaled forward."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(_rank_scaled_forward, module)  # type: ignore[method-assign]


class PerExampleLora:
    """Per-example copies of the trained LoRA weights ``params``, one batch at a time.

    :meth:`expand` gives every trained weight a fresh per-example leaf for a batch of ``n``
    examples; after the batch's backward pass :meth:`gradients` returns, for each of ``params``
    in order, an fp32 tensor ``(n, *param.shape)`` whose row ``i`` is example ``i``'s gradient.
    The parameters themselves get no gradient from such a pass.
    """

    def __init__(self, slots: Sequence[tuple[nn.Parameter, LoraLinear, str]]) -> None:
        self._slots = list(slots)  # (parameter, its layer, the layer attribute for its copy)
        self._leaves: list[torch.Tensor] = []

    def expand(self, n: int) -> None:
        """Per-example leaves for the next batch of ``n`` examples (rows of the forward input)."""
        if n < 1:
            raise ValueError(f"a per-example batch needs at least one example, got {n}")
        self._leaves = []
        for param, layer, attribute in self._slots:
            leaf = param.detach().unsqueeze(0).expand(n, *param.shape).requires_grad_()
            setattr(layer, attribute, leaf)
            self._leaves.append(leaf)

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's per-example gradients from the last backward pass (fp32)."""
        grads: list[torch.Tensor] = []
        for leaf, (param, _, _) in zip(self._leaves, self._slots, strict=True):
            if leaf.grad is None:
                raise RuntimeError(
                    f"no per-example gradient for a LoRA weight of shape {tuple(param.shape)}: "
                    "the batch's loss does not depend on it"
                )
            grads.append(leaf.grad.float())
            leaf.grad = None
        return grads

    def clear(self) -> None:
        """Back to the shared weights: remove every per-example copy from the layers."""
        self._leaves = []
        for _, layer, attribute in self._slots:
            layer.__dict__.pop(attribute, None)


def _per_example_slots(
    model: nn.Module, params: Sequence[nn.Parameter]
) -> list[tuple[nn.Parameter, LoraLinear, str]]:
    """Where each of ``params`` sits: a LoRA A or B weight of a layer with fedsilo's forward."""
    owners: dict[int, tuple[LoraLinear, str]] = {}
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        rank_scaled = getattr(module.forward, "__func__", None) is _rank_scaled_forward
        for adapter_name in module.active_adapters:
            for matrices, attribute in ((module.lora_A, _EXAMPLE_A), (module.lora_B, _EXAMPLE_B)):
                if adapter_name in matrices and rank_scaled:
                    linear = cast(nn.Linear, matrices[adapter_name])
                    owners[id(linear.weight)] = (module, attribute)
    names = {id(param): name for name, param in model.named_parameters()}
    slots: list[tuple[nn.Parameter, LoraLinear, str]] = []
    for param in params:
        owner = owners.get(id(param))
        if owner is None:
            name = names.get(id(param), f"of shape {tuple(param.shape)}")
            raise TypeError(
                f"per-example gradients cover LoRA A and B weights only; the trainable "
                f"parameter {name} is not one"
            )
        slots.append((param, *owner))
    return slots


@contextmanager
def per_example_lora(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[PerExampleLora]:
    """Inside the block ``model``'s forward passes can keep per-example gradients of ``params``.

    Every one of ``params`` must be a LoRA A or B weight (TypeError otherwise: a gradient this
    cannot split per example would escape the clipping). The copies are removed on exit, also
    on error, so the layers are as they were.
    """
    handle = PerExampleLora(_per_example_slots(model, params))
    try:
        yield handle
    finally:
        handle.clear()

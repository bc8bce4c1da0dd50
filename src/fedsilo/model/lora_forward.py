"""A cheaper forward for peft's LoRA linear layers: the scaling applied to the rank-r activation.

peft computes ``base(x) + B(A(x)) * scaling``: the multiplication runs on the layer's whole
output (tokens x out_features) and again in the backward pass. ``base(x) + B(A(x) * scaling)``
is the same function and the same gradients, with the multiplication on a tokens x r tensor.
``lora_A`` and ``lora_B`` are still called as modules, so Opacus's per-example gradient hooks
on them (record-level DP-SGD) see what they see under peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


def _rank_scaled_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    active = self.active_adapters
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
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    lora_a = cast(nn.Linear, self.lora_A[name])
    lora_x = self._cast_input_dtype(x, lora_a.weight.dtype)
    hidden = lora_a(self.lora_dropout[name](lora_x)) * self.scaling[name]
    return (result + self.lora_B[name](hidden)).to(result.dtype)


def use_rank_scaled_forward(model: nn.Module) -> None:
    """Give every peft LoRA linear layer of ``model`` the rank-scaled forward."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(_rank_scaled_forward, module)  # type: ignore[method-assign]

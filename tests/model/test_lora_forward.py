"""The rank-scaled LoRA forward computes peft's function and gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from fedsilo.model import get_adapter_state, set_adapter_state


def _with_peft_forward(model: PeftModel) -> int:
    """Remove the per-layer forward, so each layer runs peft's own; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and "forward" in vars(m)]
    for layer in layers:
        del layer.forward
    return len(layers)


def _loss_and_grads(
    model: PeftModel, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_rank_scaled_forward_matches_peft_in_output_and_gradients(
    make_lora: Callable[[int], PeftModel],
) -> None:
    ours, peft_own = make_lora(3), make_lora(3)
    assert _with_peft_forward(peft_own) > 0 and _with_peft_forward(make_lora(3)) > 0
    # A non-zero B, so the adapter changes the output and both matrices get gradients.
    state = {name: torch.randn_like(t) * 0.1 for name, t in get_adapter_state(ours).items()}
    set_adapter_state(ours, state)
    set_adapter_state(peft_own, state)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))

    logits, grads = _loss_and_grads(ours, ids)
    want_logits, want_grads = _loss_and_grads(peft_own, ids)

    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-7)


def test_a_disabled_adapter_falls_back_to_peft(make_lora: Callable[[int], PeftModel]) -> None:
    model = make_lora(3)
    state = {name: torch.randn_like(t) for name, t in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))

    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=ids).logits
    with torch.no_grad():
        untrained = make_lora(3)(input_ids=ids).logits  # B = 0: the base model's function
        adapted = model(input_ids=ids).logits

    torch.testing.assert_close(disabled, untrained)
    assert not torch.allclose(adapted, untrained)

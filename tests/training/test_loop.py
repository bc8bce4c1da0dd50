from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft.tuners.lora.layer import LoraLayer

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.model.adapters import get_adapter_state, set_adapter_state
from fedsilo.training.loop import (
    LocalTrainingResult,
    PlainGradient,
    StepProgress,
    micro_batches,
    train_plain,
)
from fedsilo.training.precision import hold_base_weights_in
from fedsilo.training.progress import progress_lines, progress_to, site_progress

from ..lora_casts import keep_lora_input_casts, record_lora_input_casts


def _train(config: FedsiloConfig, *, mu: float) -> tuple[dict[str, torch.Tensor], int]:
    loaded = load_model_with_adapter(config)
    records = [ChatRecord(prompt=f"code {i}", response=f"A{i:02d}.{i}") for i in range(6)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    result = train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=4,
        batch_size=2,
        learning_rate=0.05,
        proximal_mu=mu,
        max_grad_norm=None,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=1,
    )
    return result.delta, result.num_examples


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(torch.sum(t**2) for t in delta.values())))


def test_local_training_changes_only_adapter_and_reports_examples(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    delta, count = _train(make_config(), mu=0.0)

    assert count == 6
    assert all("lora_" in name for name in delta)
    assert _norm(delta) > 0


def test_strong_proximal_term_shrinks_the_update(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    free, _ = _train(make_config(), mu=0.0)
    anchored, _ = _train(make_config(), mu=100.0)

    assert _norm(anchored) < 0.5 * _norm(free)


def test_training_is_deterministic_for_a_seed(make_config: Callable[..., FedsiloConfig]) -> None:
    first, _ = _train(make_config(), mu=0.0)
    second, _ = _train(make_config(), mu=0.0)

    assert all(torch.equal(first[n], second[n]) for n in first)


def _setup(config: FedsiloConfig) -> tuple[Any, list[Example], int]:
    loaded = load_model_with_adapter(config)
    records = [
        ChatRecord(prompt=f"code {i}" * (1 + i % 3), response=f"A{i:02d}.{i}") for i in range(8)
    ]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    # Non-zero B, so every LoRA matrix has a gradient from the first step.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in loaded.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return loaded, examples, int(loaded.tokenizer.pad_token_id)


def _gradients(
    loaded: Any, examples: list[Example], method: Any, pad_id: int
) -> list[torch.Tensor]:
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    loaded.model.zero_grad(set_to_none=True)
    method.set_gradients(loaded.model, examples, params=params, pad_id=pad_id, precision="fp32")
    grads = [p.grad.detach().clone() for p in params]
    loaded.model.zero_grad(set_to_none=True)
    return grads


def test_micro_batches_give_the_whole_batch_gradient(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded, examples, pad_id = _setup(make_config())

    whole = _gradients(loaded, examples, PlainGradient(batch_size=8, micro_batch_size=8), pad_id)
    pieces = _gradients(loaded, examples, PlainGradient(batch_size=8, micro_batch_size=3), pad_id)

    for left, right in zip(whole, pieces, strict=True):
        torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-7)


def _three_steps(loaded: Any, examples: list[Example], pad_id: int) -> LocalTrainingResult:
    """Three FedProx steps from the model's current adapter."""
    return train_plain(
        loaded.model,
        examples,
        global_state=get_adapter_state(loaded.model),
        steps=3,
        batch_size=4,
        learning_rate=0.01,
        proximal_mu=0.1,
        max_grad_norm=1.0,
        pad_id=pad_id,
        seed=0,
    )


def test_bf16_training_sends_fp32_deltas_and_keeps_adapters_fp32(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded, examples, pad_id = _setup(make_config())
    hold_base_weights_in(loaded.model, "bf16")

    result = _three_steps(loaded, examples, pad_id)

    assert result.precision == "bf16"
    assert all(delta.dtype == torch.float32 for delta in result.delta.values())
    assert all(bool(torch.isfinite(delta).all()) for delta in result.delta.values())
    assert _norm(result.delta) > 0
    assert all(
        param.dtype == torch.float32
        for name, param in loaded.model.named_parameters()
        if "lora_" in name
    )


def test_bf16_lora_layers_read_their_input_uncast_with_the_same_training(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, examples, pad_id = _setup(make_config())
    hold_base_weights_in(loaded.model, "bf16")
    casting = record_lora_input_casts(loaded.model)

    start = get_adapter_state(loaded.model)
    uncast = _three_steps(loaded, examples, pad_id).delta
    assert casting and not any(casting)
    layers = [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]
    assert all(layer.cast_input_dtype_enabled for layer in layers)  # restored after
    set_adapter_state(loaded.model, start)
    keep_lora_input_casts(monkeypatch)
    casting.clear()
    cast = _three_steps(loaded, examples, pad_id).delta
    assert casting and all(casting)
    # peft's cast to fp32 and autocast's cast back are exact for bf16 values: training
    # without them gives the same update to the bit.
    assert uncast.keys() == cast.keys()
    assert all(torch.equal(uncast[name], cast[name]) for name in uncast)


def test_progress_is_reported_after_every_step(make_config: Callable[..., FedsiloConfig]) -> None:
    loaded, examples, pad_id = _setup(make_config())
    seen: list[StepProgress] = []

    result = train_plain(
        loaded.model,
        examples,
        global_state=get_adapter_state(loaded.model),
        steps=3,
        batch_size=4,
        learning_rate=0.01,
        proximal_mu=0.0,
        max_grad_norm=None,
        pad_id=pad_id,
        seed=0,
        on_step=seen.append,
    )

    assert [(p.step, p.steps) for p in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1].tokens == result.tokens
    assert all(p.loss is not None and p.tokens_per_second > 0 for p in seen)


def test_micro_batches_sort_by_length_and_keep_every_example() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batch = [Example(input_ids=(0,) * n, labels=(0,) * n) for n in lengths]

    pieces = list(micro_batches(batch, size=3))

    assert [[len(e.input_ids) for e in piece] for piece in pieces] == [[1, 2, 3], [5, 7, 8], [9]]


def test_a_site_reports_its_progress_to_the_current_sink() -> None:
    said: list[str] = []
    steps = [StepProgress(step, 20, 100 * step, float(step), 1.0) for step in range(1, 21)]

    with progress_to(progress_lines(said.append)):
        for progress in steps:
            site_progress("st-mary")(progress)

    assert said[0] == "site st-mary: training step 1/20, 100 tokens/s"
    assert [line.split()[4] for line in said] == [
        f"{n}/20," for n in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
    ]

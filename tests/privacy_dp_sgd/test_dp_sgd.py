"""DP-SGD local training: clipping, noise scale, Poisson sampling, mechanics and cleanup."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch import nn

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.batching import collate
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.model.adapters import AdapterState, get_adapter_state
from fedsilo.model.lora_forward import per_example_lora
from fedsilo.privacy.dp_sgd import (
    DpTrainingResult,
    clip_per_example,
    clipped_per_example_gradients,
    poisson_batches,
    train_local_dp,
)
from fedsilo.training.loop import train_plain
from fedsilo.training.loss import labelled_token_losses
from fedsilo.training.precision import hold_base_weights_in

from ..lora_casts import keep_lora_input_casts, record_lora_input_casts

PER_EXAMPLE_ATTRS = ("_fedsilo_example_a", "_fedsilo_example_b")


@dataclass
class Setup:
    model: PeftModel
    examples: list[Example]
    global_state: AdapterState
    pad_id: int

    @property
    def params(self) -> list[nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]


@pytest.fixture
def setup(make_config: Callable[..., FedsiloConfig]) -> Setup:
    loaded = load_model_with_adapter(make_config())
    # Answers of different lengths, so batches are padded.
    records = [ChatRecord(prompt=f"code {i}", response="A" * (i + 1) + ".9") for i in range(6)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    # Make B non-zero so that every LoRA matrix has a gradient from the first step.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in loaded.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return Setup(
        model=loaded.model,
        examples=examples,
        global_state=get_adapter_state(loaded.model),
        pad_id=int(loaded.tokenizer.pad_token_id),
    )


def _run(setup: Setup, **overrides: Any) -> DpTrainingResult:
    arguments: dict[str, Any] = {
        "global_state": setup.global_state,
        "steps": 3,
        "expected_batch_size": 2,
        "learning_rate": 0.01,
        "max_grad_norm": 1.0,
        "noise_multiplier": 1.0,
        "proximal_mu": 0.0,
        "pad_id": setup.pad_id,
        "seed": 7,
    }
    arguments.update(overrides)
    return train_local_dp(setup.model, setup.examples, **arguments)


def _single_example_gradients(setup: Setup, example: Example) -> list[torch.Tensor]:
    """The gradient of one example's mean token loss, by an ordinary backward pass."""
    setup.model.zero_grad(set_to_none=True)
    setup.model(**collate([example], pad_id=setup.pad_id)).loss.backward()
    grads = [param.grad.detach().clone() for param in setup.params if param.grad is not None]
    setup.model.zero_grad(set_to_none=True)
    return grads


def _raw_per_example(setup: Setup) -> list[torch.Tensor]:
    setup.model.train()
    with per_example_lora(setup.model, setup.params) as per_example:
        grads, _ = clipped_per_example_gradients(
            setup.model,
            setup.examples,
            per_example=per_example,
            pad_id=setup.pad_id,
            max_grad_norm=1e9,
        )
    setup.model.zero_grad(set_to_none=True)
    return grads


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()


def _flat(state: AdapterState) -> torch.Tensor:
    return torch.cat([state[name].flatten() for name in sorted(state)])


def _hooks_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


def test_per_example_gradients_match_single_example_backward(setup: Setup) -> None:
    expected = [_single_example_gradients(setup, example) for example in setup.examples]

    grads = _raw_per_example(setup)

    for row, per_param in enumerate(expected):
        for grad, reference in zip(grads, per_param, strict=True):
            torch.testing.assert_close(grad[row], reference, rtol=1e-4, atol=1e-6)


def test_no_clipped_gradient_exceeds_the_bound(setup: Setup) -> None:
    bound = float(_norms(_raw_per_example(setup)).median())
    setup.model.train()

    with per_example_lora(setup.model, setup.params) as per_example:
        clipped, _ = clipped_per_example_gradients(
            setup.model,
            setup.examples,
            per_example=per_example,
            pad_id=setup.pad_id,
            max_grad_norm=bound,
        )

    assert bool((_norms(clipped) <= bound + 1e-6).all())


def test_gradients_within_the_bound_are_not_scaled(setup: Setup) -> None:
    raw = _raw_per_example(setup)
    norms = _norms(raw)
    bound = float(norms.median())

    clipped = clip_per_example(raw, max_grad_norm=bound)

    small = norms < bound
    assert bool(small.any())
    for grad, reference in zip(clipped, raw, strict=True):
        torch.testing.assert_close(grad[small], reference[small], rtol=1e-5, atol=0.0)


def test_clipping_scales_a_large_gradient_to_the_bound_and_keeps_a_small_one() -> None:
    grads = [torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.tensor([[[0.0]], [[0.0]]])]

    clipped = clip_per_example(grads, max_grad_norm=1.0)

    torch.testing.assert_close(clipped[0][0], torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(clipped[0][1], torch.tensor([0.3, 0.4]))


def test_one_noiseless_step_equals_the_hand_computed_gradient_step(setup: Setup) -> None:
    # Divided by the expected batch size (2), not by the size of the batch drawn (3).
    batch_size, rate = 2, 2 / len(setup.examples)
    seed = next(
        s
        for s in range(1000)
        if (np.random.default_rng(s).random(len(setup.examples)) < rate).sum() == 3
    )
    (batch,) = poisson_batches(
        setup.examples, sampling_rate=rate, steps=1, generator=np.random.default_rng(seed)
    )
    per_example = [_single_example_gradients(setup, example) for example in batch]
    start = [param.detach().clone() for param in setup.params]
    learning_rate = 0.5
    expected = [
        weight - learning_rate * sum(grads[index] for grads in per_example) / batch_size
        for index, weight in enumerate(start)
    ]

    _run(
        setup,
        steps=1,
        expected_batch_size=batch_size,
        learning_rate=learning_rate,
        max_grad_norm=1e6,
        noise_multiplier=0.0,
        optimizer="sgd",
        seed=seed,
    )

    for param, reference in zip(setup.params, expected, strict=True):
        torch.testing.assert_close(param.detach(), reference, rtol=1e-4, atol=1e-6)


def test_noise_has_the_calibrated_scale(setup: Setup) -> None:
    # With this much noise the clipped gradients (norm <= C each, a handful of them) are
    # negligible next to noise of norm about sigma * C * sqrt(#coordinates).
    sigma, bound, batch_size = 50.0, 0.1, 2

    result = _run(
        setup,
        steps=1,
        expected_batch_size=batch_size,
        learning_rate=1.0,
        max_grad_norm=bound,
        noise_multiplier=sigma,
        optimizer="sgd",
    )

    measured = float(_flat(result.result.delta).std())
    assert measured == pytest.approx(sigma * bound / batch_size, rel=0.1)


def test_an_empty_batch_is_a_noise_only_step(setup: Setup) -> None:
    rate = 1 / len(setup.examples)
    seed = next(
        s
        for s in range(1000)
        if not (np.random.default_rng(s).random(len(setup.examples)) < rate).any()
    )

    noisy = _run(setup, steps=1, expected_batch_size=1, seed=seed, optimizer="sgd")
    silent = _run(
        setup, steps=1, expected_batch_size=1, seed=seed, optimizer="sgd", noise_multiplier=0.0
    )

    assert float(_flat(noisy.result.delta).abs().max()) > 0
    assert float(_flat(silent.result.delta).abs().max()) == 0
    assert math.isnan(noisy.result.train_loss) and noisy.result.tokens == 0


def test_poisson_batches_have_the_expected_mean_size_and_vary() -> None:
    examples = [Example(input_ids=(i,), labels=(i,)) for i in range(100)]

    sizes = [
        len(batch)
        for batch in poisson_batches(
            examples, sampling_rate=0.1, steps=2000, generator=np.random.default_rng(0)
        )
    ]

    assert np.mean(sizes) == pytest.approx(10.0, abs=0.3)
    assert np.std(sizes) == pytest.approx(math.sqrt(100 * 0.1 * 0.9), rel=0.1)


def test_poisson_batches_hold_each_example_at_most_once() -> None:
    examples = [Example(input_ids=(i,), labels=(i,)) for i in range(20)]

    batches = list(
        poisson_batches(examples, sampling_rate=0.5, steps=50, generator=np.random.default_rng(1))
    )

    assert all(len({ex.input_ids for ex in batch}) == len(batch) for batch in batches)


def test_training_is_deterministic_for_a_seed(setup: Setup) -> None:
    first = _run(setup)
    second = _run(setup)
    other = _run(setup, seed=8)

    assert torch.equal(_flat(first.result.delta), _flat(second.result.delta))
    assert not torch.equal(_flat(first.result.delta), _flat(other.result.delta))


def test_result_reports_the_mechanism(setup: Setup) -> None:
    result = _run(setup, steps=4, expected_batch_size=3, noise_multiplier=1.5, max_grad_norm=0.5)

    assert (result.sampling_rate, result.steps) == (3 / len(setup.examples), 4)
    assert (result.noise_multiplier, result.max_grad_norm) == (1.5, 0.5)
    assert result.result.num_examples == len(setup.examples)
    assert set(result.result.delta) == set(setup.global_state)


def test_proximal_gradient_is_added_after_the_noise(setup: Setup) -> None:
    # Step 1 is the same with or without the proximal term (w = w_global there); step 2 then
    # differs by exactly -lr * mu * (w_1 - w_global), noise included, for plain SGD.
    learning_rate, mu = 0.1, 2.0
    after_one = _run(setup, steps=1, learning_rate=learning_rate, optimizer="sgd")
    free = _run(setup, steps=2, learning_rate=learning_rate, optimizer="sgd")
    anchored = _run(setup, steps=2, learning_rate=learning_rate, optimizer="sgd", proximal_mu=mu)

    difference = _flat(anchored.result.delta) - _flat(free.result.delta)
    torch.testing.assert_close(
        difference, -learning_rate * mu * _flat(after_one.result.delta), rtol=1e-4, atol=1e-7
    )


def test_only_adapter_weights_change(setup: Setup) -> None:
    before = {
        name: param.detach().clone()
        for name, param in setup.model.named_parameters()
        if not param.requires_grad
    }

    _run(setup)

    after = dict(setup.model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_model_is_left_without_per_example_traces(setup: Setup) -> None:
    hooks_before = _hooks_count(setup.model)
    setup.model.eval()

    _run(setup)

    assert _hooks_count(setup.model) == hooks_before
    assert not setup.model.training
    assert not any(
        attr in module.__dict__ for module in setup.model.modules() for attr in PER_EXAMPLE_ATTRS
    )
    assert all(param.grad is None for param in setup.model.parameters())


def test_model_trains_normally_afterwards(
    setup: Setup, make_config: Callable[..., FedsiloConfig]
) -> None:
    fresh = load_model_with_adapter(make_config()).model
    arguments: dict[str, Any] = {
        "global_state": setup.global_state,
        "steps": 2,
        "batch_size": 2,
        "learning_rate": 0.01,
        "proximal_mu": 0.0,
        "max_grad_norm": None,
        "pad_id": setup.pad_id,
        "seed": 1,
    }
    _run(setup)

    used = train_plain(setup.model, setup.examples, **arguments)
    reference = train_plain(fresh, setup.examples, **arguments)

    assert torch.equal(_flat(used.delta), _flat(reference.delta))


def test_per_example_copies_are_removed_when_training_fails(setup: Setup) -> None:
    setup.model.train()

    with (
        pytest.raises(RuntimeError, match="boom"),
        per_example_lora(setup.model, setup.params) as per_example,
    ):
        per_example.expand(2)
        raise RuntimeError("boom")

    assert not any(
        attr in module.__dict__ for module in setup.model.modules() for attr in PER_EXAMPLE_ATTRS
    )


def test_per_example_gradients_match_opacus_per_sample_hooks(setup: Setup) -> None:
    # Opacus's per-sample gradient hooks on the LoRA A and B linear layers as the reference.
    from opacus.grad_sample import GradSampleHooks

    setup.model.train()
    hooks = GradSampleHooks(setup.model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        batch = collate(setup.examples, pad_id=setup.pad_id)
        losses = labelled_token_losses(setup.model, batch).per_example_mean()
        with warnings.catch_warnings():
            # The first adapted layers' inputs need no gradient (the base is frozen).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        reference = [param.grad_sample.detach().clone() for param in setup.params]
    finally:
        hooks.cleanup()
    setup.model.zero_grad(set_to_none=True)

    grads = _raw_per_example(setup)

    assert len(grads) == len(reference)
    for grad, expected in zip(grads, reference, strict=True):
        assert grad.shape == expected.shape == (len(setup.examples), *grad.shape[1:])
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_a_trainable_parameter_that_is_not_a_lora_weight_is_refused(setup: Setup) -> None:
    embedding = setup.model.get_input_embeddings().weight
    embedding.requires_grad_(True)

    with pytest.raises(TypeError, match=r"LoRA A and B weights only.*embed_tokens"):
        _run(setup)


def test_ffa_lora_keeps_per_example_gradients_of_b_only(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config(lora={"ffa": True}))
    records = [ChatRecord(prompt=f"code {i}", response="B" * (i + 1)) for i in range(3)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    pad_id = int(loaded.tokenizer.pad_token_id)
    ffa = Setup(loaded.model, examples, get_adapter_state(loaded.model), pad_id)
    trained = [name for name, param in loaded.model.named_parameters() if param.requires_grad]
    assert trained and all(".lora_B." in name for name in trained)
    expected = [_single_example_gradients(ffa, example) for example in examples]

    grads = _raw_per_example(ffa)

    for row, per_param in enumerate(expected):
        for grad, reference in zip(grads, per_param, strict=True):
            torch.testing.assert_close(grad[row], reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": 7}, "expected_batch_size"),
        ({"steps": 0}, "steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        ({"optimizer": "adagrad"}, "optimizer"),
    ],
)
def test_bad_arguments_are_refused(setup: Setup, overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _run(setup, **overrides)


def test_an_empty_dataset_is_refused(setup: Setup) -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        train_local_dp(
            setup.model,
            [],
            global_state=setup.global_state,
            steps=1,
            expected_batch_size=1,
            learning_rate=0.1,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            proximal_mu=0.0,
            pad_id=setup.pad_id,
            seed=0,
        )


def test_bf16_clips_fp32_per_example_gradients_to_the_same_bound(setup: Setup) -> None:
    hold_base_weights_in(setup.model, "bf16")
    setup.model.train()
    bound = 1e-3  # far below every example's norm: each one is scaled to the bound

    with per_example_lora(setup.model, setup.params) as per_example:
        clipped, _ = clipped_per_example_gradients(
            setup.model,
            setup.examples,
            per_example=per_example,
            pad_id=setup.pad_id,
            max_grad_norm=bound,
            precision="bf16",
        )

    assert all(grad.dtype == torch.float32 for grad in clipped)
    assert bool((_norms(clipped) <= bound * (1 + 1e-5)).all())


def test_bf16_reports_the_same_mechanism_to_the_accountant(setup: Setup) -> None:
    fp32 = _run(setup)
    hold_base_weights_in(setup.model, "bf16")

    bf16 = _run(setup)

    assert bf16.result.precision == "bf16"
    mechanism = ("sampling_rate", "steps", "noise_multiplier", "max_grad_norm")
    assert [getattr(bf16, name) for name in mechanism] == [
        getattr(fp32, name) for name in mechanism
    ]
    assert all(delta.dtype == torch.float32 for delta in bf16.result.delta.values())


def test_micro_batches_do_not_change_the_update(setup: Setup) -> None:
    whole = _run(setup, micro_batch_size=16, noise_multiplier=0.5)
    pieces = _run(setup, micro_batch_size=1, noise_multiplier=0.5)

    torch.testing.assert_close(_flat(whole.result.delta), _flat(pieces.result.delta))


def test_bf16_per_example_gradients_are_the_same_without_peft_input_casts(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LoRA layers read their bf16 input uncast; Opacus casts the activations it keeps to the
    # gradients' bf16 anyway, so the private update must not change at all.
    hold_base_weights_in(setup.model, "bf16")
    casting = record_lora_input_casts(setup.model)

    uncast = _run(setup)
    assert casting and not any(casting)
    keep_lora_input_casts(monkeypatch)
    casting.clear()
    cast = _run(setup)
    assert casting and all(casting)

    assert uncast.result.delta.keys() == cast.result.delta.keys()
    assert all(torch.equal(uncast.result.delta[k], cast.result.delta[k]) for k in cast.result.delta)
    assert uncast.result.train_loss == cast.result.train_loss

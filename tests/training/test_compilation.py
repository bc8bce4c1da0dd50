import gc
import threading
import weakref
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from fedsilo.client.site import LoadedModel, load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.config.schema import DeviceSetting
from fedsilo.data.encode import encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.privacy.dp_sgd import train_local_dp
from fedsilo.training.compilation import (
    CompileError,
    compiled_training,
    decoder_layers,
    is_prepared,
    prepare_compiled_training,
    resolve_compile,
)
from fedsilo.training.loop import LocalTrainingResult, train_plain


def _failing_probe(device: DeviceSetting) -> None:
    raise RuntimeError(f"no C++ compiler for {device}")


def _succeeding_probe(device: DeviceSetting) -> None:
    del device


def test_off_never_probes() -> None:
    choice = resolve_compile("off", probe=_failing_probe)

    assert not choice.enabled
    assert choice.probe_seconds is None


def test_auto_falls_back_to_eager_with_the_probe_error() -> None:
    choice = resolve_compile("auto", probe=_failing_probe)

    assert not choice.enabled
    assert "no C++ compiler for cpu" in choice.reason
    assert "eager" in choice.describe()


def test_on_refuses_a_machine_where_compilation_fails_naming_the_setting() -> None:
    with pytest.raises(CompileError, match=r"train.compile = 'on'.*no C\+\+ compiler"):
        resolve_compile("on", probe=_failing_probe)


def test_auto_compiles_where_the_probe_succeeds() -> None:
    choice = resolve_compile("auto", probe=_succeeding_probe)

    assert choice.enabled
    assert choice.as_record()["enabled"] is True


def _load(config: FedsiloConfig, *, compiled: bool) -> LoadedModel:
    loaded = load_model_with_adapter(config)
    if compiled:
        prepare_compiled_training(loaded.model)
    return loaded


def _train_loaded(loaded: LoadedModel) -> LocalTrainingResult:
    records = [ChatRecord(prompt=f"code {i}", response=f"A{i:02d}.{i}") for i in range(6)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    return train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=3,
        batch_size=4,
        learning_rate=0.05,
        proximal_mu=0.0,
        max_grad_norm=1.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=1,
    )


def _train(config: FedsiloConfig, *, compiled: bool) -> LocalTrainingResult:
    return _train_loaded(_load(config, compiled=compiled))


def test_compiled_plain_training_matches_eager_in_fp32(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    config = make_config()
    torch._dynamo.reset()
    counters.clear()

    eager = _train(config, compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = _train(config, compiled=True)

    # The compiled layers really ran (dynamo captured graphs) and gave eager's update.
    assert counters["stats"]["unique_graphs"] > 0
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-5)
    # Adam divides by the gradient's size, so a coordinate whose gradient is near zero can move
    # by up to the learning rate on a last-bit difference in summation order: a loose absolute
    # tolerance (updates here are about 0.1), which a wrong gradient would still exceed.
    assert max(float(tensor.abs().max()) for tensor in eager.delta.values()) > 0.05
    for name, tensor in eager.delta.items():
        torch.testing.assert_close(compiled.delta[name], tensor, rtol=1e-3, atol=1e-3)


def test_compiled_layers_are_installed_only_inside_the_block(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())  # compile "off" in test configs
    assert not is_prepared(loaded.model)
    prepare_compiled_training(loaded.model)
    assert is_prepared(loaded.model)
    layers = decoder_layers(loaded.model)

    with compiled_training(loaded.model):
        assert all(layer._compiled_call_impl is not None for layer in layers)
    # Evaluation, generation and DP-SGD run eager on the same module.
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_two_sites_train_compiled_at_the_same_time_as_they_would_eager(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    # run.concurrent_sites trains two model copies in two threads (the demo does); the copies
    # are loaded one after the other, as fedsilo.simulation.sites loads them.
    config = make_config()
    eager = _train(config, compiled=False)
    copies = [_load(config, compiled=True) for _ in range(2)]
    results: list[LocalTrainingResult] = []
    errors: list[BaseException] = []

    def train(loaded: LoadedModel) -> None:
        try:
            results.append(_train_loaded(loaded))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=train, args=(loaded,)) for loaded in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    assert len(results) == 2
    for result in results:
        assert result.train_loss == pytest.approx(eager.train_loss, rel=1e-5)


def test_a_dropped_prepared_model_frees_its_layers(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    # A deployed site reloads its model for a new adapter shape: the old layers (the base
    # weights) must not outlive it through their compiled calls.
    loaded = _load(make_config(), compiled=True)
    layer = weakref.ref(decoder_layers(loaded.model)[0])
    del loaded
    gc.collect()

    assert layer() is None


def _train_dp_loaded(loaded: LoadedModel, steps: int) -> LocalTrainingResult:
    records = [ChatRecord(prompt=f"code {i}", response="A" * (i % 5 + 1)) for i in range(12)]
    examples = encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )
    return train_local_dp(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=steps,
        expected_batch_size=5,
        learning_rate=0.05,
        max_grad_norm=0.5,
        noise_multiplier=0.3,
        proximal_mu=0.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=2,
        micro_batch_size=3,
    ).result


def test_compiled_dp_sgd_matches_eager_in_fp32_without_recompiling_per_batch(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    # Poisson batches of varying size, cut into micro-batches of varying length: dynamic
    # shapes must absorb them, not one compilation per batch.
    config = make_config()
    steps = 8
    torch._dynamo.reset()
    counters.clear()

    eager = _train_dp_loaded(_load(config, compiled=False), steps)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = _train_dp_loaded(_load(config, compiled=True), steps)

    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 4, f"{graphs} graphs compiled for {steps} steps"
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-5)
    assert max(float(tensor.abs().max()) for tensor in eager.delta.values()) > 0.05
    for name, tensor in eager.delta.items():
        torch.testing.assert_close(compiled.delta[name], tensor, rtol=1e-3, atol=1e-3)

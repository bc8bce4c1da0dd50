"""train.device: where the model is placed, where batches go, and what differs on a GPU.

No test here needs a GPU. Where a test stands in for one it replaces the answer to "which
device is the model on" in one module and checks the decision that module takes from it.
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.bench.quality import QualityRequest, _identity, base_config
from fedsilo.client.site import LoadedModel, load_model_with_adapter
from fedsilo.config import ConfigError, FedsiloConfig
from fedsilo.config.schema import EvaluationSection
from fedsilo.data.encode import Example, encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.data.tasks import build_task
from fedsilo.evaluation import gold as gold_module
from fedsilo.evaluation.gold import evaluate_task_gold
from fedsilo.privacy import dp_sgd as dp_module
from fedsilo.privacy.dp_sgd import train_local_dp
from fedsilo.training import device as device_module
from fedsilo.training import loop as loop_module
from fedsilo.training import loss as loss_module
from fedsilo.training.device import (
    DeviceError,
    attention_kernel,
    dp_micro_batch_size,
    model_device,
    plain_micro_batch_size,
    resolve_device,
)
from fedsilo.training.loop import micro_batches, train_plain
from fedsilo.training.loss import labelled_token_losses
from fedsilo.training.precision import machine_precision, resolve_precision

CUDA = torch.device("cuda")  # a device object only: nothing is placed on it


class _ReachedTheModelError(Exception):
    """Raised by a forward pre-hook once it has seen where the batch was put."""


@pytest.fixture(autouse=True)
def _fresh_choice() -> Iterator[None]:
    machine_precision.cache_clear()
    yield
    machine_precision.cache_clear()


def _examples(loaded: LoadedModel, count: int = 8) -> list[Example]:
    records = [
        ChatRecord(prompt=f"code {i}" * (1 + i % 3), response=f"A{i:02d}.{i}") for i in range(count)
    ]
    return encode_records(
        loaded.tokenizer, records, system_prompt=None, max_length=64, source="test"
    )


def test_the_device_defaults_to_the_cpu_and_takes_only_cpu_or_cuda(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    assert make_config().train.device == "cpu"
    assert make_config(train={"device": "cuda"}).train.device == "cuda"
    with pytest.raises(ConfigError, match=r"train\.device: Input should be 'cpu' or 'cuda'"):
        make_config(train={"device": "gpu"})


def test_cuda_without_a_gpu_is_refused_naming_the_setting() -> None:
    assert resolve_device("cpu", cuda_available=False) == torch.device("cpu")
    assert resolve_device("cuda", cuda_available=True) == CUDA
    with pytest.raises(DeviceError, match=r"train\.device = 'cuda'"):
        resolve_device("cuda", cuda_available=False)


def test_loading_for_cuda_without_a_gpu_fails_before_loading_anything(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        "fedsilo.client.site.resolve_base_model",
        lambda spec: pytest.fail("the model was looked up before the device was checked"),
    )

    with pytest.raises(DeviceError, match=r"train\.device"):
        load_model_with_adapter(make_config(train={"device": "cuda"}))


def test_a_gpu_takes_whole_batches_and_larger_dp_micro_batches() -> None:
    cpu = torch.device("cpu")
    assert plain_micro_batch_size(cpu, 32) == 16
    assert dp_micro_batch_size(cpu) == 8
    assert plain_micro_batch_size(CUDA, 16) == 16
    assert dp_micro_batch_size(CUDA) == 64


def test_the_cpu_loads_the_plain_attention_kernel_and_a_gpu_the_fused_one(
    tiny_model_dir: Path,
) -> None:
    assert attention_kernel(torch.device("cpu")) == "eager"
    assert attention_kernel(CUDA) == "sdpa"
    config = FedsiloConfig.model_validate({"model": {"base": str(tiny_model_dir)}})
    loaded = load_model_with_adapter(config)
    assert loaded.model.get_base_model().config._attn_implementation == "eager"


def test_auto_precision_on_cuda_is_bf16_where_supported_without_a_cpu_probe() -> None:
    def no_probe() -> tuple[float, float]:
        raise AssertionError("no CPU probe on a GPU")

    emulated = frozenset({"avx2"})  # a CPU that would never get bf16
    choice = resolve_precision("auto", flags=emulated, probe=no_probe, device="cuda", gpu_bf16=True)
    assert choice.precision == "bf16"
    assert choice.as_record()["device"] == "cuda"
    assert "on cuda" in choice.describe()
    fallback = resolve_precision("auto", probe=no_probe, device="cuda", gpu_bf16=False)
    assert fallback.precision == "fp32"
    assert resolve_precision("fp32", device="cuda", gpu_bf16=True).precision == "fp32"
    assert resolve_precision("fp32").as_record()["device"] == "cpu"


def test_the_loss_moves_each_batch_to_the_models_device(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model_with_adapter(make_config())
    batch = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[-100, 2, 3]]),
    }
    seen: list[torch.device] = []

    def record(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["input_ids"].device)
        raise _ReachedTheModelError

    decoder, _ = loss_module.decoder_and_head(loaded.model)
    decoder.register_forward_pre_hook(record, with_kwargs=True)
    # The model reports the meta device: the batch must arrive there, not stay on the CPU.
    monkeypatch.setattr(loss_module, "model_device", lambda _model: torch.device("meta"))

    with pytest.raises(_ReachedTheModelError):
        labelled_token_losses(loaded.model, batch)
    assert seen == [torch.device("meta")]


def test_gold_scoring_moves_its_batches_to_the_models_device(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config()
    loaded = load_model_with_adapter(config)
    task = build_task(config.task, seed=0)
    seen: list[torch.device] = []

    def record(_module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        assert isinstance(ids, torch.Tensor)
        seen.append(ids.device)
        raise _ReachedTheModelError

    decoder, _ = loss_module.decoder_and_head(loaded.model)
    decoder.register_forward_pre_hook(record, with_kwargs=True)
    monkeypatch.setattr(gold_module, "model_device", lambda _model: torch.device("meta"))

    with pytest.raises(_ReachedTheModelError):
        evaluate_task_gold(
            loaded.model, loaded.tokenizer, task, max_new_tokens=2, batch_size=4, max_length=96
        )
    assert seen == [torch.device("meta")]


def _micro_batch_sizes(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    """Record the ``size`` of every micro_batches call made from ``module``."""
    sizes: list[int] = []

    def spy(batch: Sequence[Example], *, size: int) -> Iterator[list[Example]]:
        sizes.append(size)
        return micro_batches(batch, size=size)

    monkeypatch.setattr(module, "micro_batches", spy)
    return sizes


def _plain(loaded: LoadedModel, examples: list[Example], batch_size: int) -> Any:
    return train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=1,
        batch_size=batch_size,
        learning_rate=0.01,
        proximal_mu=0.0,
        max_grad_norm=1.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=1,
    )


def _dp(loaded: LoadedModel, examples: list[Example]) -> Any:
    return train_local_dp(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=2,
        expected_batch_size=8,
        learning_rate=0.01,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        proximal_mu=0.0,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=3,
    )


def test_micro_batch_sizes_follow_the_models_device(
    make_config: Callable[..., FedsiloConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model_with_adapter(make_config())
    examples = _examples(loaded, count=10)

    plain_sizes = _micro_batch_sizes(monkeypatch, loop_module)
    _plain(loaded, examples, batch_size=8)
    dp_sizes = _micro_batch_sizes(monkeypatch, dp_module)
    _dp(loaded, examples)
    assert set(plain_sizes) == {16} and set(dp_sizes) == {8}

    # The same calls on a model that reports a GPU (fp32 compute, so nothing else changes).
    monkeypatch.setattr(loop_module, "model_device", lambda _model: CUDA)
    monkeypatch.setattr(dp_module, "model_device", lambda _model: CUDA)
    plain_sizes.clear()
    dp_sizes.clear()
    _plain(loaded, examples, batch_size=8)
    _dp(loaded, examples)
    assert set(plain_sizes) == {8} and set(dp_sizes) == {64}


def test_an_explicit_cpu_device_trains_and_scores_exactly_as_the_default(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    def run(config: FedsiloConfig) -> tuple[Any, Any, float]:
        loaded = load_model_with_adapter(config)
        assert model_device(loaded.model) == torch.device("cpu")
        assert all(t.device.type == "cpu" for t in loaded.adapter_template.values())
        examples = _examples(loaded)
        plain = _plain(loaded, examples, batch_size=4)
        private = _dp(loaded, examples)
        metrics = evaluate_task_gold(
            loaded.model,
            loaded.tokenizer,
            build_task(config.task, seed=0),
            max_new_tokens=2,
            batch_size=4,
            max_length=96,
        )
        return plain.delta, private.result.delta, metrics.loss

    default = run(make_config())
    explicit = run(make_config(train={"device": "cpu"}))

    for left, right in zip(default[:2], explicit[:2], strict=True):
        assert all(torch.equal(left[name], right[name]) for name in left)
        assert all(torch.isfinite(t).all() and t.device.type == "cpu" for t in right.values())
    assert default[2] == explicit[2]


def test_the_quality_benchmark_trains_on_the_requested_device_under_the_same_identity(
    tmp_path: Path,
) -> None:
    def request(device: Any) -> QualityRequest:
        return QualityRequest(
            "icd10-alpha1", "m", tmp_path, tmp_path / "r.json", say=print, device=device
        )

    on_gpu, on_cpu = base_config(request("cuda")), base_config(request("cpu"))
    assert (on_gpu.train.device, on_cpu.train.device) == ("cuda", "cpu")
    assert on_gpu.evaluation.batch_size == 128
    assert on_cpu.evaluation.batch_size == EvaluationSection().batch_size
    # A results file measured on one device can be resumed on the other.
    assert _identity(request("cuda"), on_gpu, "h") == _identity(request("cpu"), on_cpu, "h")


def test_device_module_keeps_cpu_sizes_of_before() -> None:
    # The CPU loop's figures are what the CPU benchmarks in docs/ were measured with.
    assert loop_module.DEFAULT_PLAIN_MICRO_BATCH == device_module.CPU_PLAIN_MICRO_BATCH == 16
    assert dp_module.DEFAULT_MICRO_BATCH_SIZE == device_module.CPU_DP_MICRO_BATCH == 8

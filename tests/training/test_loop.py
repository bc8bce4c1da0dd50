from collections.abc import Callable

import pytest
import torch

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.training.loop import proximal_term, train_plain


def test_proximal_term_matches_hand_computation() -> None:
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]

    value = proximal_term(params, anchors, mu=0.1)

    # 0.5 * 0.1 * (1 + 4 + 4)
    assert value.item() == pytest.approx(0.45)


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

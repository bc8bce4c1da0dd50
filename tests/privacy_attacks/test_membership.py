from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import encode_records
from fedsilo.data.records import ChatRecord
from fedsilo.privacy.attacks.membership import (
    loss_threshold_auc,
    loss_threshold_auc_ci,
    membership_auc,
)
from fedsilo.training.loop import train_plain


def test_perfect_separation_gives_one() -> None:
    assert loss_threshold_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0


def test_reversed_separation_gives_zero() -> None:
    assert loss_threshold_auc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0


def test_identical_losses_give_one_half() -> None:
    assert loss_threshold_auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5


def test_ties_count_one_half_by_hand() -> None:
    # Pairs (member, non-member): (1,2) win, (1,3) win, (2,2) tie, (2,3) win -> 3.5 / 4.
    assert loss_threshold_auc([1.0, 2.0], [2.0, 3.0]) == 0.875


def test_mixed_case_by_hand() -> None:
    # Members 1, 3, 5 against non-members 2, 3, 4:
    # 1 beats all three (3); 3 beats 4, ties 3 (1.5); 5 beats none (0) -> 4.5 / 9.
    assert loss_threshold_auc([1.0, 3.0, 5.0], [2.0, 3.0, 4.0]) == 0.5


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
)
def test_auc_equals_the_pairwise_count(members: list[int], nonmembers: list[int]) -> None:
    wins = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)

    auc = loss_threshold_auc([float(m) for m in members], [float(n) for n in nonmembers])

    assert auc == pytest.approx(wins / (len(members) * len(nonmembers)), abs=1e-12)


def test_the_interval_holds_the_auc_and_narrows_with_more_records() -> None:
    rng = np.random.default_rng(0)

    def interval(count: int) -> tuple[float, float, float]:
        members = rng.normal(0.0, 1.0, count).tolist()  # a small real signal
        nonmembers = rng.normal(0.3, 1.0, count).tolist()
        low, high = loss_threshold_auc_ci(members, nonmembers)
        return low, loss_threshold_auc(members, nonmembers), high

    few, many = interval(32), interval(2000)

    assert few[0] <= few[1] <= few[2] and many[0] <= many[1] <= many[2]
    assert many[2] - many[0] < 0.1 < few[2] - few[0]
    # Seeded: the same losses give the same interval.
    assert loss_threshold_auc_ci([1.0, 2.0, 3.0], [2.5, 4.0]) == loss_threshold_auc_ci(
        [1.0, 2.0, 3.0], [2.5, 4.0]
    )
    assert loss_threshold_auc_ci([1.0, 1.0], [1.0]) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("members", "nonmembers", "message"),
    [
        ([], [1.0], "member_losses is empty"),
        ([1.0], [], "nonmember_losses is empty"),
        ([1.0, float("nan")], [1.0], r"member_losses\[1\] is not finite"),
        ([1.0], [float("inf")], r"nonmember_losses\[0\] is not finite"),
    ],
)
def test_invalid_losses_are_refused_by_name(
    members: list[float], nonmembers: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        loss_threshold_auc(members, nonmembers)


def _random_records(rng: np.random.Generator, count: int, *, tag: str) -> list[ChatRecord]:
    alphabet = list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789")
    return [
        ChatRecord(prompt=f"Note {tag}{i}.", response="".join(rng.choice(alphabet, size=10)))
        for i in range(count)
    ]


def test_the_same_records_on_both_sides_give_one_half(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())
    records = _random_records(np.random.default_rng(0), 6, tag="s")

    auc = membership_auc(
        loaded.model,
        loaded.tokenizer,
        records,
        records,
        system_prompt=None,
        batch_size=4,
        max_length=64,
    )

    assert auc == 0.5


def test_records_trained_on_are_recognised(make_config: Callable[..., FedsiloConfig]) -> None:
    loaded = load_model_with_adapter(make_config())
    rng = np.random.default_rng(0)
    members = _random_records(rng, 8, tag="m")
    nonmembers = _random_records(rng, 8, tag="n")
    examples = encode_records(
        loaded.tokenizer, members, system_prompt=None, max_length=64, source="test"
    )
    train_plain(
        loaded.model,
        examples,
        global_state=loaded.adapter_template,
        steps=40,
        batch_size=8,
        learning_rate=0.01,
        proximal_mu=0.0,
        max_grad_norm=None,
        pad_id=int(loaded.tokenizer.pad_token_id),
        seed=0,
    )

    auc = membership_auc(
        loaded.model,
        loaded.tokenizer,
        members,
        nonmembers,
        system_prompt=None,
        batch_size=8,
        max_length=64,
    )

    assert auc > 0.9

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedsilo.client.site import load_model_with_adapter
from fedsilo.config import FedsiloConfig
from fedsilo.data.encode import IGNORE_INDEX, encode_record, encode_records
from fedsilo.data.records import ChatRecord, Record, TextRecord
from fedsilo.privacy.attacks.canary import (
    CANARY_PROMPT,
    CANARY_TEMPLATE,
    Canary,
    candidate_secrets,
    exposure,
    exposure_from_log_likelihoods,
    exposure_with,
    make_canaries,
    plant,
    sequence_log_likelihood,
)
from fedsilo.training.loop import train_plain


def _canary(secret: str = "123456") -> Canary:
    response = CANARY_TEMPLATE.format(name="Ada Moreau", secret=secret)
    return Canary(
        secret=secret,
        text_prefix="Patient Ada Moreau MRN ",
        record=ChatRecord(prompt=CANARY_PROMPT, response=response),
    )


def _secret_of(record: ChatRecord) -> str:
    return record.response.split("MRN ")[1].split(" ")[0]


# --- the exposure formula -------------------------------------------------------------------


def test_true_secret_ranked_first_of_99_has_exposure_log2_100() -> None:
    canary = _canary()

    def scorer(records: Sequence[ChatRecord]) -> list[float]:
        return [1.0 if record == canary.record else 0.0 for record in records]

    value = exposure_with(scorer, canary, candidates=99, rng=np.random.default_rng(0))

    assert value == pytest.approx(math.log2(100))


def test_true_secret_ranked_last_has_exposure_zero() -> None:
    canary = _canary()

    def scorer(records: Sequence[ChatRecord]) -> list[float]:
        return [-1.0 if record == canary.record else 0.0 for record in records]

    value = exposure_with(scorer, canary, candidates=99, rng=np.random.default_rng(0))

    assert value == 0.0


def test_ties_rank_ahead_of_the_true_secret() -> None:
    canary = _canary()

    def constant(records: Sequence[ChatRecord]) -> list[float]:
        return [0.0] * len(records)

    value = exposure_with(constant, canary, candidates=50, rng=np.random.default_rng(0))

    assert value == 0.0


def test_exposure_ranks_by_the_scorers_values() -> None:
    canary = _canary("500000")
    # A scorer that prefers numerically larger secrets: the rank is 1 + candidates above 500000.
    expected_others = candidate_secrets(canary, count=200, rng=np.random.default_rng(7))
    rank = 1 + sum(int(secret) > 500000 for secret in expected_others)

    def by_value(records: Sequence[ChatRecord]) -> list[float]:
        return [float(_secret_of(record)) for record in records]

    value = exposure_with(by_value, canary, candidates=200, rng=np.random.default_rng(7))

    assert value == pytest.approx(math.log2(201) - math.log2(rank))


def test_exposure_from_log_likelihoods_by_hand() -> None:
    # One candidate above, one tied (counted ahead), one below: rank 3 of 4.
    value = exposure_from_log_likelihoods(-2.0, [-1.0, -2.0, -3.0])

    assert value == pytest.approx(math.log2(4) - math.log2(3))


@pytest.mark.parametrize("scores", [[], [0.0, float("nan")], [float("-inf")]])
def test_exposure_rejects_empty_or_non_finite_candidate_scores(scores: list[float]) -> None:
    with pytest.raises(ValueError, match="candidate"):
        exposure_from_log_likelihoods(0.0, scores)


def test_exposure_rejects_non_finite_true_score() -> None:
    with pytest.raises(ValueError, match="true log-likelihood"):
        exposure_from_log_likelihoods(float("nan"), [0.0])


def test_exposure_rejects_a_scorer_returning_the_wrong_count() -> None:
    def short(records: Sequence[ChatRecord]) -> list[float]:
        return [0.0]

    with pytest.raises(ValueError, match="1 scores for 11 records"):
        exposure_with(short, _canary(), candidates=10, rng=np.random.default_rng(0))


# --- candidates and canaries ----------------------------------------------------------------


def test_candidate_secrets_are_distinct_other_secrets_of_the_same_length() -> None:
    canary = _canary("000042")

    secrets = candidate_secrets(canary, count=300, rng=np.random.default_rng(0))

    assert len(set(secrets)) == 300
    assert "000042" not in secrets
    assert all(len(secret) == 6 and secret.isdigit() for secret in secrets)


def test_candidate_secrets_can_cover_the_whole_space_but_the_true_one() -> None:
    canary = Canary(
        secret="3",
        text_prefix="MRN ",
        record=ChatRecord(prompt="p", response="MRN 3."),
    )

    secrets = candidate_secrets(canary, count=9, rng=np.random.default_rng(0))

    assert sorted(secrets) == ["0", "1", "2", "4", "5", "6", "7", "8", "9"]


def test_candidate_secrets_refuse_more_than_the_space_holds() -> None:
    canary = Canary(secret="3", text_prefix="", record=ChatRecord(prompt="p", response="3"))

    with pytest.raises(ValueError, match="between 1 and 9"):
        candidate_secrets(canary, count=10, rng=np.random.default_rng(0))


def test_with_secret_replaces_only_the_secret() -> None:
    record = _canary("123456").with_secret("654321")

    assert record == ChatRecord(
        prompt=CANARY_PROMPT, response="Patient Ada Moreau MRN 654321 was seen today."
    )


@pytest.mark.parametrize("secret", ["12345", "1234567", "12345a", "١٢٣٤٥٦"])
def test_with_secret_refuses_a_secret_of_another_shape(secret: str) -> None:
    with pytest.raises(ValueError, match="6 digits"):
        _canary().with_secret(secret)


def test_canary_refuses_a_record_that_does_not_hold_its_secret() -> None:
    with pytest.raises(ValueError, match="does not start with"):
        Canary(
            secret="123456",
            text_prefix="Patient X MRN ",
            record=ChatRecord(prompt="p", response="Patient X MRN 999999 was seen today."),
        )


def test_make_canaries_fills_the_template_with_distinct_secrets() -> None:
    canaries = make_canaries(20, digits=4, rng=np.random.default_rng(0))

    assert len({canary.secret for canary in canaries}) == 20
    for canary in canaries:
        assert canary.digits == 4
        assert canary.record.prompt == CANARY_PROMPT
        assert canary.record.response == canary.with_secret(canary.secret).response
        assert canary.record.response.endswith(f"MRN {canary.secret} was seen today.")


def test_make_canaries_is_deterministic_for_a_seed() -> None:
    first = make_canaries(5, digits=6, rng=np.random.default_rng(3))
    second = make_canaries(5, digits=6, rng=np.random.default_rng(3))

    assert first == second


@pytest.mark.parametrize("digits", [0, 19])
def test_make_canaries_refuses_unsupported_digit_counts(digits: int) -> None:
    with pytest.raises(ValueError, match="digits must be between 1 and 18"):
        make_canaries(1, digits=digits, rng=np.random.default_rng(0))


# --- planting -------------------------------------------------------------------------------


def _records(count: int) -> list[Record]:
    return [ChatRecord(prompt=f"q{i}", response=f"a{i}") for i in range(count - 1)] + [
        TextRecord(text="a plain note")
    ]


def test_plant_inserts_each_canary_repeats_times() -> None:
    canaries = make_canaries(3, digits=6, rng=np.random.default_rng(0))

    planted = plant(_records(10), canaries, repeats=4, rng=np.random.default_rng(1))

    assert len(planted) == 10 + 3 * 4
    for canary in canaries:
        assert planted.count(canary.record) == 4


def test_plant_keeps_the_originals_in_order_and_leaves_the_input_alone() -> None:
    records = _records(10)
    before = list(records)
    canaries = make_canaries(2, digits=6, rng=np.random.default_rng(0))
    canary_records = {canary.record for canary in canaries}

    planted = plant(records, canaries, repeats=3, rng=np.random.default_rng(1))

    assert [record for record in planted if record not in canary_records] == before
    assert records == before


def test_plant_positions_are_deterministic_for_a_seed_and_vary_across_seeds() -> None:
    canaries = make_canaries(1, digits=6, rng=np.random.default_rng(0))

    def positions(seed: int) -> list[int]:
        planted = plant(_records(50), canaries, repeats=5, rng=np.random.default_rng(seed))
        return [i for i, record in enumerate(planted) if record == canaries[0].record]

    assert positions(1) == positions(1)
    assert positions(1) != positions(2)


def test_plant_refuses_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        plant(_records(3), [_canary()], repeats=0, rng=np.random.default_rng(0))


# --- scoring on the tiny model --------------------------------------------------------------


def _manual_log_likelihood(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, record: ChatRecord
) -> float:
    """Sum of log-softmax at each answer token, one record at a time, no padding."""
    example = encode_record(tokenizer, record, system_prompt="Note.", max_length=10_000)
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(
        float(log_probs[t - 1, label])
        for t, label in enumerate(example.labels)
        if t > 0 and label != IGNORE_INDEX
    )


def test_sequence_log_likelihood_sums_the_answer_token_log_probabilities(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())
    loaded.model.eval()
    records = [
        ChatRecord(prompt="short", response="x"),
        ChatRecord(prompt="a longer prompt here", response="a longer answer, with more bytes"),
    ]

    scores = sequence_log_likelihood(
        loaded.model, loaded.tokenizer, records, system_prompt="Note.", batch_size=2
    )

    expected = [_manual_log_likelihood(loaded.model, loaded.tokenizer, r) for r in records]
    assert scores == pytest.approx(expected, rel=1e-4)


def test_sequence_log_likelihood_leaves_the_model_mode_as_it_was(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())
    loaded.model.train()

    sequence_log_likelihood(
        loaded.model, loaded.tokenizer, [_canary().record], system_prompt=None, batch_size=1
    )

    assert loaded.model.training


def test_a_planted_canary_is_exposed_and_a_fresh_one_is_not(
    make_config: Callable[..., FedsiloConfig],
) -> None:
    loaded = load_model_with_adapter(make_config())
    rng = np.random.default_rng(0)
    planted_canary, fresh_canary = make_canaries(2, digits=6, rng=rng)
    records = [
        ChatRecord(prompt=f"Code case {i}.", response=f"A{i:02d}.{i % 7}") for i in range(16)
    ]
    training = plant(records, [planted_canary], repeats=8, rng=rng)
    examples = encode_records(
        loaded.tokenizer, training, system_prompt=None, max_length=96, source="test"
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

    exposures = [
        exposure(
            loaded.model,
            loaded.tokenizer,
            canary,
            candidates=200,
            rng=np.random.default_rng(1),
            system_prompt=None,
            batch_size=64,
        )
        for canary in (planted_canary, fresh_canary)
    ]

    planted_exposure, fresh_exposure = exposures
    assert planted_exposure > fresh_exposure + 3.0
    assert planted_exposure > math.log2(201) - 1.0  # ranked in the top two of 201

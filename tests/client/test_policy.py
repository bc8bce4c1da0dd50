"""The site's own policy file, checked against each round task before any training."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from fedsilo.client.policy import (
    MAX_POLICY_BYTES,
    PolicyError,
    SitePolicy,
    TaskRefusedError,
    check_lora,
    check_task,
    load_policy,
)
from fedsilo.protocol.records import LoraSpec, RoundTask

TASK = RoundTask(
    federation_id="cardio-pilot",
    run_id="r",
    stage="train",
    run_name="n",
    round=1,
    cohort_size=4,
    base_model_hash="sha256:" + "a" * 64,
    local_steps=10,
    batch_size=8,
    learning_rate=1e-3,
    max_length=96,
    max_grad_norm=1.0,
    proximal_mu=0.0,
    seed=1,
)


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


BASE = """
[accept]
federation_id = "cardio-pilot"
base_model_hash = "sha256:{digest}"
[limits]
min_cohort = 3
learning_rate = [1e-5, 1e-2]
local_steps = [1, 50]
""".replace("{digest}", "a" * 64)


def test_task_within_policy_is_accepted(tmp_path: Path) -> None:
    check_task(load_policy(_policy(tmp_path, BASE)), TASK, site="cardiology")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"federation_id": "other"}, "policy accepts federation 'cardio-pilot'"),
        ({"base_model_hash": "sha256:" + "b" * 64}, "policy accepts base model"),
        ({"cohort_size": 2}, "the round sums 2 sites; policy requires at least 3"),
        ({"learning_rate": 0.5}, "learning_rate=0.5 is outside the policy's range"),
        ({"local_steps": 500}, "local_steps=500 is outside"),
    ],
)
def test_task_outside_policy_is_refused(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    policy = load_policy(_policy(tmp_path, BASE))

    with pytest.raises(TaskRefusedError, match=reason):
        check_task(policy, replace(TASK, **change), site="cardiology")  # type: ignore[arg-type]


LORA = LoraSpec(rank=8, alpha=16.0, dropout=0.05, target_modules=("q_proj", "v_proj"))
LORA_LIMITS = """
lora_rank = [1, 16]
lora_alpha = [1, 32]
lora_dropout = [0, 0.1]
lora_targets = ["q_proj", "k_proj", "v_proj"]
"""


def test_adapter_within_policy_is_accepted(tmp_path: Path) -> None:
    check_lora(load_policy(_policy(tmp_path, BASE + LORA_LIMITS)), LORA, site="cardiology")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rank": 32}, r"lora_rank=32 is outside the policy's range \[1, 16\]"),
        ({"alpha": 512.0}, r"lora_alpha=512 is outside the policy's range \[1, 32\]"),
        ({"dropout": 0.9}, r"lora_dropout=0.9 is outside the policy's range \[0, 0.1\]"),
        (
            {"target_modules": ("q_proj", "down_proj", "lm_head")},
            r"target_modules \['down_proj', 'lm_head'\] are not in the policy's lora_targets",
        ),
    ],
)
def test_adapter_outside_policy_is_refused(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    policy = load_policy(_policy(tmp_path, BASE + LORA_LIMITS))

    with pytest.raises(TaskRefusedError, match=reason):
        check_lora(policy, replace(LORA, **change), site="cardiology")  # type: ignore[arg-type]


def test_default_limits_bound_alpha_and_dropout_but_not_targets(tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, BASE))
    check_lora(policy, replace(LORA, target_modules=("gate_proj", "up_proj")), site="c")

    with pytest.raises(TaskRefusedError, match="lora_alpha=100000 is outside"):
        check_lora(policy, replace(LORA, alpha=1e5), site="c")


def test_an_empty_target_list_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"limits\.lora_targets"):
        load_policy(_policy(tmp_path, BASE + "lora_targets = []\n"))


def test_policy_errors_name_file_and_field(tmp_path: Path) -> None:
    path = _policy(tmp_path, BASE + "\n[privacy]\nmax_epsilon = -1\ndelta = 1e-5\n")

    with pytest.raises(PolicyError, match=r"policy\.toml.*\n.*privacy\.max_epsilon"):
        load_policy(path)


def test_inverted_range_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path, '[accept]\nfederation_id = "x"\n[limits]\nbatch_size = [64, 1]\n')

    with pytest.raises(
        PolicyError, match=r"limits: .*batch_size: lower bound 64(\.0)? exceeds upper bound 1"
    ):
        load_policy(path)


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ("learning_rate = [nan, 1.0]\n", "limits.learning_rate.0"),
        ("learning_rate = [0.0, inf]\n", "limits.learning_rate.1"),
        ('batch_size = ["1", "64"]\n', "limits.batch_size.0"),
        ("batch_size = [true, 64]\n", "limits.batch_size.0"),
        ("learning_rate = [-1.0, 1.0]\n", "limits.learning_rate.0"),
        ('min_cohort = "3"\n', "limits.min_cohort"),
        ('lora_targets = [""]\n', "limits.lora_targets.0"),
        ("[privacy]\nmax_epsilon = inf\ndelta = 1e-5\n", "privacy.max_epsilon"),
        ('[privacy]\nmax_epsilon = "8"\ndelta = 1e-5\n', "privacy.max_epsilon"),
    ],
)
def test_a_bound_that_is_not_a_finite_number_as_written_is_refused(
    tmp_path: Path, rules: str, field: str
) -> None:
    # NaN passed the ordering check and infinity switched a budget off; strings and booleans
    # were coerced to numbers.
    text = '[accept]\nfederation_id = "x"\n' + ("" if rules.startswith("[") else "[limits]\n")
    with pytest.raises(PolicyError, match=re.escape(field)):
        load_policy(_policy(tmp_path, text + rules))


def test_an_unreadable_policy_file_is_named(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[accept]\nfederation_id = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(PolicyError, match=r"latin1\.toml: not UTF-8 text"):
        load_policy(latin1)
    with pytest.raises(PolicyError, match=rf"{re.escape(str(tmp_path))}: cannot be read: Is a dir"):
        load_policy(tmp_path)
    big = tmp_path / "big.toml"
    big.write_text("#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match=r"big\.toml: .*over the"):
        load_policy(big)


def test_missing_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="site policy file not found"):
        load_policy(tmp_path / "none.toml")


EPOCH_POLICY = BASE + "local_epochs = [0.5, 3]\n"


def test_task_in_epochs_within_policy_is_accepted(tmp_path: Path) -> None:
    task = replace(TASK, local_steps=0, local_epochs=2.0)

    check_task(load_policy(_policy(tmp_path, EPOCH_POLICY)), task, site="c", num_examples=160)


def test_task_with_too_many_epochs_is_refused(tmp_path: Path) -> None:
    task = replace(TASK, local_steps=0, local_epochs=5.0)

    with pytest.raises(TaskRefusedError, match=r"local_epochs=5\.0 is outside"):
        check_task(load_policy(_policy(tmp_path, EPOCH_POLICY)), task, site="c")


def test_epochs_that_come_to_too_many_steps_are_refused(tmp_path: Path) -> None:
    # 2 epochs of 400 records at batch 8 are 100 steps; the policy allows 50.
    task = replace(TASK, local_steps=0, local_epochs=2.0)

    with pytest.raises(TaskRefusedError, match="more local steps than the policy's maximum of 50"):
        check_task(load_policy(_policy(tmp_path, EPOCH_POLICY)), task, site="c", num_examples=400)


@pytest.mark.parametrize(
    ("epochs", "records", "said"),
    [
        (1000.0, 1234, "more local steps than the policy's maximum of 1000"),
        (0.5, 77, "fewer local steps than the policy's minimum of 50"),
    ],
)
def test_an_epoch_refusal_tells_the_coordinator_nothing_derived_from_the_record_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, epochs: float, records: int, said: str
) -> None:
    # At batch 1 the steps are the record count times the epochs: the refusal must not say it.
    policy = load_policy(
        _policy(
            tmp_path,
            '[accept]\nfederation_id = "cardio-pilot"\n[limits]\nlocal_steps = [50, 1000]\n',
        )
    )
    task = replace(TASK, local_steps=0, local_epochs=epochs, batch_size=1)
    steps = task.steps_for(records)

    with caplog.at_level("INFO"), pytest.raises(TaskRefusedError) as refused:
        check_task(policy, task, site="c", num_examples=records)

    reason = str(refused.value)
    assert said in reason and f"local_epochs={epochs:g} at batch_size=1" in reason
    assert not re.search(rf"\b({records}|{steps})\b", reason), reason
    assert f"comes to {steps} local steps over its {records} records" in caplog.text


@pytest.mark.parametrize(
    ("required", "allowed"),
    [("any", {"clear", "secagg", "he"}), ("secagg", {"secagg"}), ("he", {"he"})],
)
def test_a_policy_says_how_the_sites_update_may_leave(required: str, allowed: set[str]) -> None:
    from fedsilo.client.policy import SitePolicy, check_channel

    policy = SitePolicy.model_validate(
        {"accept": {"federation_id": "fed", "aggregation": required}}
    )
    for channel in ("clear", "secagg", "he"):
        if channel in allowed:
            check_channel(policy, channel, site="st-mary")  # type: ignore[arg-type]
        else:
            with pytest.raises(TaskRefusedError, match=f"accepts only aggregation = '{required}'"):
                check_channel(policy, channel, site="st-mary")  # type: ignore[arg-type]


def test_an_unknown_aggregation_requirement_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = _policy(tmp_path, '[accept]\nfederation_id = "fed"\naggregation = "masked"\n')

    with pytest.raises(PolicyError, match=r"accept\.aggregation"):
        load_policy(path)


def test_a_policy_at_the_default_aggregation_keeps_the_digest_it_had_before_the_rule() -> None:
    from fedsilo.client.policy import SitePolicy, policy_digest

    rules = {"accept": {"federation_id": "fed"}, "limits": {"min_cohort": 3}}
    # Known answer: the digest of these rules before `aggregation` existed.
    before = "392ac054f338c66abd21e13cfd4822b82f1761282232b6f7935873047d71e736"

    assert policy_digest(SitePolicy.model_validate(rules)) == before
    stricter = {**rules, "accept": {"federation_id": "fed", "aggregation": "he"}}
    assert policy_digest(SitePolicy.model_validate(stricter)) != before
    for limit in ({"lora_alpha": [1, 64]}, {"lora_dropout": [0, 0]}, {"lora_targets": ["q_proj"]}):
        narrower = {**rules, "limits": {"min_cohort": 3, **limit}}
        assert policy_digest(SitePolicy.model_validate(narrower)) != before


def _privacy(rules: str, tmp_path: Path) -> SitePolicy:
    return load_policy(_policy(tmp_path, BASE + "\n[privacy]\n" + rules))


@pytest.mark.parametrize("received", [0.0, 1e-300, 0.99])
def test_a_distributed_noise_multiplier_below_the_floor_is_refused_naming_field_and_value(
    tmp_path: Path, received: float
) -> None:
    from fedsilo.client.policy import check_distributed_dp

    policy = _privacy("min_distributed_noise_multiplier = 1.0\n", tmp_path)

    with pytest.raises(TaskRefusedError) as refused:
        check_distributed_dp(policy, received, site="c")

    assert f"noise multiplier is {received:g}" in str(refused.value)
    assert "[privacy] min_distributed_noise_multiplier is 1" in str(refused.value)


def test_a_noise_multiplier_at_or_above_the_floor_is_accepted(tmp_path: Path) -> None:
    from fedsilo.client.policy import check_distributed_dp

    policy = _privacy("min_distributed_noise_multiplier = 1.0\n", tmp_path)

    check_distributed_dp(policy, 1.0, site="c")
    check_distributed_dp(policy, 3.0, site="c")
    check_distributed_dp(load_policy(_policy(tmp_path, BASE)), 0.0, site="c")  # no floor
    check_distributed_dp(None, 0.0, site="c")


def test_a_floor_on_distributed_noise_refuses_updates_in_the_clear(tmp_path: Path) -> None:
    from fedsilo.client.policy import check_channel

    policy = _privacy("min_distributed_noise_multiplier = 0.5\n", tmp_path)

    with pytest.raises(TaskRefusedError, match=r"in the clear.*min_distributed_noise_multiplier"):
        check_channel(policy, "clear", site="c")
    check_channel(policy, "secagg", site="c")
    check_channel(policy, "he", site="c")


@pytest.mark.parametrize(
    "rules", ["min_distributed_noise_multiplier = -1\n", "min_distributed_noise_multiplier = inf\n"]
)
def test_an_invalid_floor_is_refused_naming_the_field(tmp_path: Path, rules: str) -> None:
    with pytest.raises(PolicyError, match=r"privacy\.min_distributed_noise_multiplier"):
        _privacy(rules, tmp_path)


def test_a_budget_needs_both_max_epsilon_and_delta(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"privacy: .*max_epsilon and delta"):
        _privacy("max_epsilon = 8.0\n", tmp_path)


def test_a_floor_alone_sets_no_budget(tmp_path: Path) -> None:
    from fedsilo.client.privacy_budget import check_budget

    policy = _privacy("min_distributed_noise_multiplier = 1.0\n", tmp_path)

    # Without a budget a round without record-level DP is not refused for it.
    check_budget(policy, dp=None, event=None, spent=[], site="c")


def test_a_policy_without_the_floor_keeps_the_digest_it_had_before_the_rule() -> None:
    from fedsilo.client.policy import SitePolicy, policy_digest

    rules = {
        "accept": {"federation_id": "fed"},
        "limits": {"min_cohort": 3},
        "privacy": {"max_epsilon": 8.0, "delta": 1e-5},
    }
    # Known answer: the digest of these rules before `min_distributed_noise_multiplier` existed.
    before = "4151bc7d00453748984a2d618e51b0379b2e365beee8e5f5846f346a31e58bdf"

    assert policy_digest(SitePolicy.model_validate(rules)) == before
    floor = {**rules, "privacy": {**rules["privacy"], "min_distributed_noise_multiplier": 1.0}}
    assert policy_digest(SitePolicy.model_validate(floor)) != before

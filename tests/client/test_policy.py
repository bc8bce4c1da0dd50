"""The site's own policy file, checked against each round task before any training."""

from dataclasses import replace
from pathlib import Path

import pytest

from fedsilo.client.policy import PolicyError, TaskRefusedError, check_task, load_policy
from fedsilo.protocol.records import RoundTask

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

    with pytest.raises(TaskRefusedError, match="local_steps=100 is outside"):
        check_task(load_policy(_policy(tmp_path, EPOCH_POLICY)), task, site="c", num_examples=400)


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

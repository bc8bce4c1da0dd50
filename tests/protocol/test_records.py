import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedsilo.crypto import encode_signature
from fedsilo.protocol.records import (
    NO_POLICY,
    PolicyDeclaration,
    ProtocolError,
    RoundTask,
    SignedClaims,
    SignedPolicy,
    SiteMetrics,
    adapter_from_record,
    adapter_to_record,
)

TEMPLATE = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}


def _task() -> RoundTask:
    return RoundTask(
        federation_id="fed",
        run_id="run-1",
        stage="train",
        run_name="r",
        round=3,
        cohort_size=4,
        base_model_hash="sha256:00",
        local_steps=4,
        batch_size=2,
        learning_rate=1e-3,
        max_length=64,
        max_grad_norm=1.0,
        proximal_mu=0.0,
        seed=7,
    )


def test_round_task_round_trips() -> None:
    assert RoundTask.from_record(_task().to_record()) == _task()


def test_round_task_with_missing_field_is_refused() -> None:
    record = ConfigRecord({k: v for k, v in _task().to_record().items() if k != "round"})

    with pytest.raises(ProtocolError, match=r"missing fields \[.round.\]"):
        RoundTask.from_record(record)


def test_round_task_with_wrong_type_is_refused() -> None:
    record = _task().to_record()
    record["local_steps"] = "many"

    with pytest.raises(ProtocolError, match="local_steps"):
        RoundTask.from_record(record)


def test_adapter_round_trips_exactly() -> None:
    state = {name: torch.randn(t.shape) for name, t in TEMPLATE.items()}

    decoded = adapter_from_record(adapter_to_record(state), like=TEMPLATE, what="x")

    assert all(torch.equal(decoded[n], state[n]) for n in state)


def test_adapter_with_wrong_shape_is_rejected() -> None:
    bad = dict(TEMPLATE)
    bad["a.lora_A.weight"] = torch.zeros(4, 3)

    with pytest.raises(ProtocolError, match=r"update from s1.*lora_A.*shape"):
        adapter_from_record(adapter_to_record(bad), like=TEMPLATE, what="update from s1")


def test_adapter_with_extra_tensor_is_rejected() -> None:
    bad = {**TEMPLATE, "evil": torch.zeros(1)}

    with pytest.raises(ProtocolError, match="unexpected \\['evil'\\]"):
        adapter_from_record(adapter_to_record(bad), like=TEMPLATE, what="u")


def test_adapter_with_nan_is_rejected() -> None:
    bad = {n: t.clone() for n, t in TEMPLATE.items()}
    bad["a.lora_B.weight"][0, 0] = math.nan

    with pytest.raises(ProtocolError, match="NaN or infinity"):
        adapter_from_record(adapter_to_record(bad), like=TEMPLATE, what="u")


def test_adapter_with_float64_is_rejected() -> None:
    record = ArrayRecord(
        {n: Array(np.zeros(tuple(t.shape), dtype=np.float64)) for n, t in TEMPLATE.items()}
    )

    with pytest.raises(ProtocolError, match="dtype float64"):
        adapter_from_record(record, like=TEMPLATE, what="u")


def test_site_metrics_need_positive_example_count() -> None:
    record = MetricRecord({"num_examples": 0, "train_loss": 1.0, "tokens": 1, "seconds": 1.0})

    with pytest.raises(ProtocolError, match="num_examples"):
        SiteMetrics.from_record(record)


def test_round_task_in_epochs_round_trips_and_turns_into_steps() -> None:
    task = replace(_task(), local_steps=0, local_epochs=2.0, batch_size=8)

    decoded = RoundTask.from_record(task.to_record())

    assert decoded == task
    assert decoded.steps_for(100) == 26
    assert _task().steps_for(100) == 4


@pytest.mark.parametrize(
    ("steps", "epochs"), [(0, 0.0), (4, 1.0), (-1, 0.0), (0, math.nan), (0, -1.0)]
)
def test_round_task_needs_exactly_one_local_budget(steps: int, epochs: float) -> None:
    record = _task().to_record()
    record["local_steps"], record["local_epochs"] = steps, epochs

    with pytest.raises(ProtocolError, match="exactly one of local_steps"):
        RoundTask.from_record(record)


def test_signed_policy_round_trips_with_and_without_a_policy() -> None:
    declared = SignedPolicy(PolicyDeclaration(policy_sha256="ab" * 32, min_cohort=3), b"s" * 64)
    absent = SignedPolicy(PolicyDeclaration(policy_sha256=None, min_cohort=1), b"t" * 64)

    assert SignedPolicy.from_record(declared.to_record()) == declared
    assert {k: v for k, v in absent.to_record().items() if k != "signature"} == {
        "policy_sha256": NO_POLICY,
        "min_cohort": 1,
    }
    assert SignedPolicy.from_record(absent.to_record()) == absent


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"policy_sha256": "ab" * 31, "min_cohort": 2}, "64 lowercase hex"),
        ({"policy_sha256": "AB" * 32, "min_cohort": 2}, "64 lowercase hex"),
        ({"policy_sha256": "sha256:" + "ab" * 32, "min_cohort": 2}, "64 lowercase hex"),
        ({"policy_sha256": "ab" * 32, "min_cohort": 0}, "min_cohort"),
        ({"policy_sha256": "ab" * 32, "min_cohort": 10**7}, "min_cohort"),
        ({"policy_sha256": "ab" * 32, "min_cohort": True}, "min_cohort"),
        ({"policy_sha256": "ab" * 32, "min_cohort": 2.0}, "min_cohort"),
        ({"policy_sha256": 7, "min_cohort": 2}, "policy_sha256"),
        ({"min_cohort": 2}, "exactly policy_sha256 and min_cohort"),
        ({"policy_sha256": "ab" * 32, "min_cohort": 2, "note": "x"}, "exactly"),
    ],
)
def test_policy_declaration_refuses_malformed_values(
    values: dict[str, object], complaint: str
) -> None:
    signature = encode_signature(b"s" * 64)
    with pytest.raises(ProtocolError, match=complaint):
        SignedPolicy.from_record(ConfigRecord({**values, "signature": signature}))  # type: ignore[dict-item]


def test_policy_declaration_without_a_signature_is_refused() -> None:
    with pytest.raises(ProtocolError, match="carries no signature"):
        SignedPolicy.from_record(ConfigRecord({"policy_sha256": "ab" * 32, "min_cohort": 2}))


@pytest.mark.parametrize(
    "metrics",
    [
        SiteMetrics(8, 2.5, 300, 1e-05, "fp32", 0.125),
        SiteMetrics(8, None, 300, 3, "bf16", None),  # seconds as an int, as a site might hold it
        SiteMetrics.withheld(precision="fp32"),
    ],
)
def test_metrics_decoded_by_the_coordinator_have_the_claim_fields_the_site_signed(
    metrics: SiteMetrics,
) -> None:
    received = SiteMetrics.from_record(metrics.to_record())

    assert received.claim_fields() == metrics.claim_fields()
    assert [type(v) for v in received.claim_fields().values()] == [
        type(v) for v in metrics.claim_fields().values()
    ]


def test_signed_claims_round_trip() -> None:
    claims = SignedClaims("cd" * 32, b"s" * 64)

    assert SignedClaims.from_record(claims.to_record()) == claims


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"claims_sha256": "cd" * 31}, "64 lowercase hex"),
        ({"claims_sha256": "CD" * 32}, "64 lowercase hex"),
        ({"claims_sha256": 7}, "64 lowercase hex"),
        ({}, "exactly claims_sha256 and signature"),
        ({"claims_sha256": "cd" * 32, "num_examples": 8}, "exactly"),
    ],
)
def test_signed_claims_refuse_malformed_values(values: dict[str, object], complaint: str) -> None:
    signature = encode_signature(b"s" * 64)
    with pytest.raises(ProtocolError, match=complaint):
        SignedClaims.from_record(ConfigRecord({**values, "signature": signature}))  # type: ignore[dict-item]

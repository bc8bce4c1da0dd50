"""Values a peer sends are bounded before use: sizes as they arrived (not as declared), numbers
finite and in range, JSON neither deep nor huge, ciphertexts in the layout the sum needs."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsilo.privacy.he import ckks
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import (
    Advertisement,
    SecAggMessageError,
    SecAggParams,
    ShareBundle,
    UnmaskReply,
)
from fedsilo.privacy.secagg.site import SiteSession, advertise
from fedsilo.protocol.he_records import keygen_from_content, keygen_record
from fedsilo.protocol.records import (
    MAX_ADAPTER_VALUE,
    PAYLOAD_ARRAY,
    DpTask,
    LoraSpec,
    ProtocolError,
    RoundTask,
    SiteMetrics,
    adapter_from_record,
    check_adapter_layout,
    check_adapter_values,
    payload_from_record,
    payload_to_record,
)

TEMPLATE = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.zeros(3, 2)}


def _npy(array: np.ndarray, *, pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickle)
    return buffer.getvalue()


def _header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def _payload_record(
    data: bytes, *, shape: tuple[int, ...] = (64,), stype: str = "numpy.ndarray"
) -> ArrayRecord:
    return ArrayRecord({PAYLOAD_ARRAY: Array(dtype="uint8", shape=shape, stype=stype, data=data)})


def test_payload_size_is_what_arrived_not_what_is_declared() -> None:
    data = _npy(np.zeros(38_000, dtype=np.uint8))

    with pytest.raises(ProtocolError, match="exceeds the maximum of 1000"):
        payload_from_record(_payload_record(data, shape=(1,)), max_bytes=1000, what="update")


def test_payload_whose_record_misstates_its_shape_is_refused() -> None:
    data = _npy(np.zeros(500, dtype=np.uint8))

    with pytest.raises(ProtocolError, match=r"declares uint8 \(1,\)"):
        payload_from_record(_payload_record(data, shape=(1,)), max_bytes=1000, what="update")


def test_header_claiming_a_terabyte_is_refused_without_allocating() -> None:
    data = _header("|u1", (2**40,)) + b"\x00" * 64

    with pytest.raises(ProtocolError, match="header declares shape"):
        payload_from_record(_payload_record(data), max_bytes=1 << 20, what="update")


@pytest.mark.parametrize(
    ("data", "stype", "reason"),
    [
        (_npy(np.zeros(64, dtype=np.uint8)), "torch.Tensor", "serialization"),
        (b"PK\x03\x04 this is not a numpy array at all", "numpy.ndarray", "not a numpy array"),
        (_npy(np.array([1, "a"], dtype=object), pickle=True), "numpy.ndarray", "dtype object"),
    ],
    ids=["wrong serialization type", "not numpy bytes", "object array"],
)
def test_malformed_payload_array_is_a_protocol_error(data: bytes, stype: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        payload_from_record(_payload_record(data, stype=stype), max_bytes=1000, what="update")


def test_payload_round_trips() -> None:
    payload = bytes(range(256)) * 3

    assert payload_from_record(payload_to_record(payload), max_bytes=1000, what="u") == payload


def test_adapter_array_larger_than_its_tensor_is_refused_before_it_is_read() -> None:
    record = ArrayRecord(
        {
            "a.lora_A": Array(
                dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x93" * 10_000
            ),
            "a.lora_B": Array(np.zeros((3, 2), dtype=np.float32)),
        }
    )

    with pytest.raises(ProtocolError, match="exceeds the maximum of 24"):
        adapter_from_record(record, like=TEMPLATE, what="global adapter")


def _task(**changes: Any) -> ConfigRecord:
    fields: dict[str, Any] = {
        "federation_id": "fed",
        "run_id": "run",
        "stage": "train",
        "run_name": "r",
        "round": 1,
        "cohort_size": 3,
        "base_model_hash": "sha256:00",
        "local_steps": 2,
        "local_epochs": 0.0,
        "batch_size": 2,
        "learning_rate": 0.01,
        "max_length": 64,
        "max_grad_norm": 1.0,
        "proximal_mu": 0.0,
        "seed": 5,
    }
    return ConfigRecord({**fields, **changes})


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": 0},
        {"max_length": -(2**63)},
        {"local_steps": -1},
        {"learning_rate": math.nan},
        {"learning_rate": math.inf},
        {"proximal_mu": -1.0},
        {"max_grad_norm": math.nan},
        {"seed": -1},
    ],
    ids=lambda change: f"{next(iter(change))}={next(iter(change.values()))}",
)
def test_round_task_out_of_range_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=next(iter(change))):
        RoundTask.from_record(_task(**change))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run_id": "../" * 10}, "run_id"),
        ({"run_id": "r" * 10_000_000}, "run_id"),
        ({"run_id": ""}, "run_id"),
        ({"stage": "train/../x"}, "stage"),
        ({"stage": "t" * 65}, "stage"),
        ({"federation_id": "f" * 1_000_000}, "federation_id"),
        ({"run_name": "n" * 1_000_000}, "run_name"),
        ({"base_model_hash": "sha256:" + "0" * 1_000_000}, "base_model_hash"),
    ],
    ids=lambda value: str(value)[:24] if isinstance(value, dict) else value,
)
def test_round_task_strings_that_are_not_plain_or_are_huge_are_refused(
    change: dict[str, Any], field: str
) -> None:
    # The run id becomes a folder of the site's receipts and an entry of its privacy record.
    with pytest.raises(ProtocolError, match=field) as refused:
        RoundTask.from_record(_task(**change))

    assert len(str(refused.value)) < 400  # the refusal quotes at most a prefix


def test_round_task_with_plain_names_round_trips() -> None:
    task = RoundTask.from_record(
        _task(run_id="0123abcd-ef_9" + "x" * 115, stage="secagg-masked", run_name="n" * 256)
    )

    assert len(task.run_id) == 128 and task.stage == "secagg-masked"


def _dp(**changes: Any) -> ConfigRecord:
    fields: dict[str, Any] = {
        "noise_multiplier": 1.0,
        "target_epsilon": 0.0,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "planned_rounds": 3,
    }
    return ConfigRecord({**fields, **changes})


@pytest.mark.parametrize(
    "change",
    [
        {"delta": math.nan},
        {"delta": 1.5},
        {"noise_multiplier": math.inf},
        {"planned_rounds": 0},
        # What no accountant can compose cheaply: refused before any accounting runs.
        {"noise_multiplier": 0.03},
        {"noise_multiplier": 2e4},
        {"planned_rounds": 2**53},
    ],
    ids=lambda change: f"{next(iter(change))}={next(iter(change.values()))}",
)
def test_dp_task_out_of_range_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="DP settings"):
        DpTask.from_record(_dp(**change))


def test_dp_task_round_trips() -> None:
    assert DpTask.from_record(_dp()).delta == 1e-5
    assert DpTask.from_record(_dp(noise_multiplier=0.3, planned_rounds=100_000)).planned_rounds
    assert DpTask.from_record(_dp(accountant="pld")).accountant == "pld"


@pytest.mark.parametrize("accountant", ["", "RDP", "gdp", "x" * 1_000_000])
def test_dp_task_with_an_unknown_accountant_is_refused(accountant: str) -> None:
    with pytest.raises(ProtocolError, match=r"accountant .* is not one of \['rdp', 'pld'\]"):
        DpTask.from_record(_dp(accountant=accountant))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"clip": 1e-300}, "clip"),  # scale overflows
        ({"clip": 1e308}, "clip"),  # scale 0
        ({"dp_clip_norm": 0.0, "dp_noise_multiplier": 1.0}, "dp_clip_norm"),
        ({"dp_clip_norm": 1e300, "dp_noise_multiplier": 1e300}, "noise std inf"),
    ],
    ids=["tiny clip", "huge clip", "noise without a clip norm", "infinite noise"],
)
def test_secagg_params_that_could_only_fail_after_training_are_refused(
    change: dict[str, float], field: str
) -> None:
    fields = {"threshold": 2, "cohort_size": 3, "clip": 1.0, "dp_clip_norm": 0.0}
    fields |= {"dp_noise_multiplier": 0.0, **change}

    with pytest.raises(SecAggMessageError, match=field):
        SecAggParams.from_fields(fields)


def test_secagg_params_with_distributed_dp_plan_a_finite_quantization() -> None:
    params = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=1.0, dp_noise_multiplier=1.0
    )

    assert math.isfinite(params.quantization().scale) and params.quantization().scale > 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run_id": "../etc"}, "run_id"),
        ({"run_id": "r" * 129}, "run_id"),
        ({"federation_id": "f" * 1_000_000}, "federation_id"),
        ({"federation_id": ""}, "federation_id"),
        ({"attempt": -1}, "attempt"),
        ({"round": 2**60}, "round"),
    ],
    ids=lambda value: str(value)[:24] if isinstance(value, dict) else value,
)
def test_secagg_session_with_hostile_names_or_numbers_is_refused(
    change: dict[str, Any], field: str
) -> None:
    from fedsilo.protocol.secagg_records import session_from_content

    record = {
        "federation_id": "fed",
        "run_id": "run",
        "round": 1,
        "attempt": 1,
        "threshold": 2,
        "cohort_size": 3,
        "clip": 1.0,
        "dp_clip_norm": 0.0,
        "dp_noise_multiplier": 0.0,
    }
    session, _ = session_from_content(RecordDict({"secagg": ConfigRecord(record)}))
    assert session.key() == "fed/run/1/1"

    with pytest.raises(ProtocolError, match=field):
        session_from_content(RecordDict({"secagg": ConfigRecord({**record, **change})}))


def test_lora_spec_with_infinite_alpha_is_refused() -> None:
    record = ConfigRecord(
        {"rank": 4, "alpha": math.inf, "dropout": 0.0, "target_modules": ["q_proj"]}
    )

    with pytest.raises(ProtocolError, match="alpha"):
        LoraSpec.from_record(record)


@pytest.mark.parametrize("field", ["alpha", "dropout"])
def test_a_boolean_is_not_a_number_in_a_lora_spec(field: str) -> None:
    fields = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj"]}

    with pytest.raises(ProtocolError, match=rf"mistypes the fields \['{field}'\]"):
        LoraSpec.from_record(ConfigRecord({**fields, field: True}))


def test_a_boolean_is_not_a_number_in_dp_settings() -> None:
    with pytest.raises(ProtocolError, match=r"mistypes the fields \['noise_multiplier'\]"):
        DpTask.from_record(_dp(noise_multiplier=True))


def test_poly_modulus_degree_zero_is_refused() -> None:
    content = RecordDict({"he": keygen_record(0)})

    with pytest.raises(ProtocolError, match="poly_modulus_degree"):
        keygen_from_content(content)


def _metrics(**changes: Any) -> MetricRecord:
    fields: dict[str, Any] = {"num_examples": 8, "train_loss": 1.5, "tokens": 100, "seconds": 2.0}
    return MetricRecord({**fields, **changes})


@pytest.mark.parametrize(
    "change",
    [
        {"seconds": math.nan},
        {"seconds": -1.0},
        {"seconds": math.inf},
        {"tokens": -5},
        {"train_loss": math.nan},
        {"train_loss": -0.5},
        {"num_examples": 0},
        # Every position padding, yet 100 tokens: the round's padding share would go to -5e12.
        {"padding_share": 1.0},
        {"padding_share": 1.5},
    ],
    ids=lambda change: f"{next(iter(change))}={next(iter(change.values()))}",
)
def test_site_metrics_out_of_range_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=next(iter(change))):
        SiteMetrics.from_record(_metrics(**change))


def test_example_count_above_the_federation_maximum_is_refused() -> None:
    with pytest.raises(ProtocolError, match="maximum of 1000000"):
        SiteMetrics.from_record(_metrics(num_examples=2**62), max_examples=1_000_000)


def test_site_metrics_round_trip() -> None:
    assert SiteMetrics.from_record(_metrics()) == SiteMetrics(8, 1.5, 100, 2.0)


DEEP = 5000
SITE, SESSION = "site-a", "fed/run/1/1"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"mask_public":' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
        (b'{"mask_public":' + b"7" * DEEP + b"}", "5000 digits"),
        (b'{"mask_public":NaN}', "NaN is not a number"),
    ],
    ids=["deep nesting", "5000-digit integer", "NaN"],
)
@pytest.mark.parametrize(
    "decode",
    [
        lambda raw: Advertisement.from_payload(raw, site=SITE, session=SESSION),
        lambda raw: ShareBundle.from_bytes(raw, sender=SITE, recipient="b"),
        lambda raw: UnmaskReply.from_payload(raw, site=SITE, survivors={SITE}, dropped=set()),
    ],
    ids=["advertisement", "share bundle", "unmask reply"],
)
def test_hostile_json_is_a_secagg_message_error(
    payload: bytes, reason: str, decode: Callable[[bytes], object]
) -> None:
    with pytest.raises(SecAggMessageError, match=reason):
        decode(payload)


def test_share_x_beyond_any_cohort_is_refused() -> None:
    bundle = ShareBundle(SITE, "b", 2**20, b"\x01" * 32, b"\x02" * 32).to_bytes()

    with pytest.raises(SecAggMessageError, match="x must be an integer"):
        ShareBundle.from_bytes(bundle, sender=SITE, recipient="b")


@pytest.fixture(scope="module")
def public_context() -> Any:
    secret = ckks.new_secret_context(4096)
    return ckks.load_context(ckks.public_part(secret), what="test", secret=False)


def test_reversed_ciphertexts_are_an_he_error(public_context: Any) -> None:
    chunks = ckks.encrypt(public_context, np.arange(3000, dtype=np.float64))
    reference = ckks.encrypted_zeros(public_context, 3000)

    with pytest.raises(ckks.HeError, match="ciphertext 0 holds 952 values, expected 2048"):
        ckks.check_vector(public_context, chunks[::-1], reference=reference, what="upload")
    with pytest.raises(ckks.HeError, match="cannot be added"):
        ckks.add_all(public_context, [chunks, chunks[::-1]], what="sum")
    ckks.check_vector(public_context, chunks, reference=reference, what="upload")


def test_ciphertexts_at_another_scale_are_an_he_error(public_context: Any) -> None:
    other = ckks.load_context(ckks.new_secret_context(4096), what="site's own", secret=True)
    other.global_scale = 2.0**30
    chunks = ckks.encrypt(other, np.arange(100, dtype=np.float64))

    with pytest.raises(ckks.HeError, match=r"ciphertext 0 cannot be added.*scale mismatch"):
        ckks.check_vector(
            public_context,
            chunks,
            reference=ckks.encrypted_zeros(public_context, 100),
            what="upload",
        )


def test_stored_session_with_a_short_key_is_a_secagg_message_error() -> None:
    params = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=0.0, dp_noise_multiplier=0.0
    )
    session = advertise(site=SITE, session=SessionId("fed", "run", 1, 1), params=params)
    stored = json.loads(session.to_bytes())
    stored["share_key"] = "00" * 3

    with pytest.raises(SecAggMessageError, match="32 bytes of hex"):
        SiteSession.from_bytes(json.dumps(stored).encode())
    assert SiteSession.from_bytes(session.to_bytes()) == session


def test_update_values_beyond_any_lora_update_are_refused() -> None:
    like = {"w": torch.zeros(3)}
    huge = {"w": torch.tensor([0.0, 2.0 * MAX_ADAPTER_VALUE, 0.0])}

    with pytest.raises(ProtocolError, match="above the bound"):
        check_adapter_layout(huge, like=like, what="update from site-a")
    check_adapter_layout({"w": torch.tensor([0.5, -MAX_ADAPTER_VALUE, 0.0])}, like=like, what="ok")


def test_a_sum_is_bounded_by_its_count() -> None:
    check_adapter_values(np.full(4, 2.5 * MAX_ADAPTER_VALUE), count=3, what="sum")
    with pytest.raises(ProtocolError, match="above the bound"):
        check_adapter_values(np.full(4, 3.5 * MAX_ADAPTER_VALUE), count=3, what="sum")

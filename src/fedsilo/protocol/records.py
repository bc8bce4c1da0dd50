"""What travels between the server and the sites, as typed Flower records.

Down (server -> site): the global adapter (ArrayRecord "global") and the round task
(ConfigRecord "task"). Up (site -> server): the adapter delta as the exact safetensors bytes the
site signed (ArrayRecord "update", one uint8 array, so Flower can chunk it), aggregate numbers
(MetricRecord "metrics") and the site's signed binding (ConfigRecord "site"). Arrays travel as
numpy buffers that Flower decodes with ``allow_pickle=False``; nothing here is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, MetricRecord, RecordDict

from fedsilo.config import LoraSection
from fedsilo.crypto import (
    Receipt,
    SignatureError,
    UpdateBinding,
    decode_signature,
    encode_signature,
)
from fedsilo.model.adapters import AdapterState, adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.protocol.schedule import local_steps_for

GLOBAL_KEY = "global"
TASK_KEY = "task"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
DP_KEY = "dp"
LORA_KEY = "lora"
DP_EVENT_KEY = "dp_event"
SITE_KEY = "site"
RECEIPT_KEY = "receipt"
PAYLOAD_ARRAY = "safetensors"
TRAIN_STAGE = "train"
TRAIN_MESSAGE = "train"
RECEIPT_MESSAGE = "query.receipt"


class ProtocolError(ValueError):
    """A message that does not have the expected shape; names the record and field."""


@dataclass(frozen=True)
class RoundTask:
    """The instructions for one site in one round."""

    federation_id: str
    run_id: str
    stage: str
    run_name: str
    round: int
    cohort_size: int  # sites asked to train in this round (their updates are summed)
    base_model_hash: str
    local_steps: int  # 0 when the budget is local_epochs
    batch_size: int
    learning_rate: float  # this round's, from the run's schedule
    max_length: int
    max_grad_norm: float  # 0 means no clipping
    proximal_mu: float
    seed: int
    local_epochs: float = 0.0  # passes over the site's records; 0 when the budget is steps

    def steps_for(self, num_examples: int) -> int:
        """The optimizer steps this task asks of a site holding ``num_examples`` records."""
        return local_steps_for(
            local_steps=self.local_steps,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            num_examples=num_examples,
        )

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundTask:
        values = dict(record)
        missing = sorted(set(_FIELD_KINDS) - set(values))
        if missing:
            raise ProtocolError(f"round task is missing fields {missing}")
        kwargs: dict[str, object] = {}
        for name, kind in _FIELD_KINDS.items():
            value = values[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(
                    f"round task field {name!r} must be {kind.__name__}, got {type(value).__name__}"
                )
            kwargs[name] = value
        steps, epochs = kwargs["local_steps"], kwargs["local_epochs"]
        assert isinstance(steps, int) and isinstance(epochs, float)
        if not math.isfinite(epochs) or steps < 0 or epochs < 0 or (steps > 0) == (epochs > 0):
            raise ProtocolError(
                f"round task must set exactly one of local_steps ({steps}) and local_epochs "
                f"({epochs}), the other 0"
            )
        return cls(**kwargs)  # type: ignore[arg-type]


_FIELD_KINDS: dict[str, type] = {
    "federation_id": str,
    "run_id": str,
    "stage": str,
    "run_name": str,
    "round": int,
    "cohort_size": int,
    "base_model_hash": str,
    "local_steps": int,
    "batch_size": int,
    "learning_rate": float,
    "max_length": int,
    "max_grad_norm": float,
    "proximal_mu": float,
    "seed": int,
    "local_epochs": float,
}


_PRECISION_BITS = {"bf16": 16, "fp32": 32}


@dataclass(frozen=True)
class SiteMetrics:
    """Aggregate numbers a site reports with its update (no per-example values).

    Under differential privacy a site releases only the DP-protected update: its weight is 1
    (its example count is not released), and no loss, token count, padding or timing is
    reported. Its compute precision depends on its hardware, not its data, and is reported.
    """

    num_examples: int
    train_loss: float | None
    tokens: int
    seconds: float
    precision: str | None = None  # "bf16" or "fp32": how the site computed
    padding_share: float | None = None  # share of the positions it processed that were padding

    @classmethod
    def withheld(cls, *, precision: str | None = None) -> SiteMetrics:
        """What a site under differential privacy reports: nothing about its data."""
        return cls(num_examples=1, train_loss=None, tokens=0, seconds=0.0, precision=precision)

    def to_record(self) -> MetricRecord:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        # A MetricRecord holds numbers only: the precision travels as its bit width.
        if self.precision is not None:
            values["precision_bits"] = _PRECISION_BITS[values.pop("precision")]
        return MetricRecord(values)

    @classmethod
    def from_record(cls, record: MetricRecord) -> SiteMetrics:
        try:
            num_examples = record["num_examples"]
            train_loss = record.get("train_loss")
            tokens = record["tokens"]
            seconds = record["seconds"]
        except KeyError as error:
            raise ProtocolError(f"site metrics are missing {error.args[0]!r}") from None
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise ProtocolError(f"num_examples must be a positive integer, got {num_examples!r}")
        if train_loss is not None and (
            not isinstance(train_loss, float | int) or not math.isfinite(train_loss)
        ):
            raise ProtocolError(f"train_loss must be a finite number, got {train_loss!r}")
        if not isinstance(tokens, int) or not isinstance(seconds, float | int):
            raise ProtocolError("tokens must be an integer and seconds a number")
        bits = record.get("precision_bits")
        precision = None
        if bits is not None:
            by_bits = {value: name for name, value in _PRECISION_BITS.items()}
            if not isinstance(bits, int) or bits not in by_bits:
                raise ProtocolError(f"precision_bits must be 16 or 32, got {bits!r}")
            precision = by_bits[bits]
        padding = record.get("padding_share")
        if padding is not None and (
            not isinstance(padding, float | int) or not 0.0 <= padding <= 1.0
        ):
            raise ProtocolError(f"padding_share must be a number in [0, 1], got {padding!r}")
        loss = None if train_loss is None else float(train_loss)
        share = None if padding is None else float(padding)
        return cls(num_examples, loss, tokens, float(seconds), precision, share)


@dataclass(frozen=True)
class DpTask:
    """Record-level DP-SGD settings sent with a round (absent: no differential privacy)."""

    noise_multiplier: float  # 0 means: calibrate to target_epsilon
    target_epsilon: float  # 0 means: use noise_multiplier
    max_grad_norm: float
    delta: float
    accountant: str
    planned_rounds: int  # the run's rounds, over which a target epsilon is spread

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> DpTask:
        kinds = {
            "noise_multiplier": float,
            "target_epsilon": float,
            "max_grad_norm": float,
            "delta": float,
            "accountant": str,
            "planned_rounds": int,
        }
        values = {
            name: float(v) if kind is float and isinstance(v, int) else v
            for name, kind in kinds.items()
            if (v := record.get(name)) is not None
        }
        return cls(**_typed_fields(values, kinds, what="the round's DP settings"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape and scaling, so that a deployed site can build the same LoRA model."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "rank": self.rank,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "target_modules": list(self.target_modules),
            }
        )

    @classmethod
    def of(cls, lora: LoraSection) -> LoraSpec:
        """The spec of a run's [lora] section."""
        return cls(lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> LoraSpec:
        values = {
            "rank": record.get("rank"),
            "alpha": float(a) if isinstance(a := record.get("alpha"), int) else a,
            "dropout": float(d) if isinstance(d := record.get("dropout"), int) else d,
        }
        fields = _typed_fields(
            values, {"rank": int, "alpha": float, "dropout": float}, what="the round's LoRA spec"
        )
        targets = record.get("target_modules")
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ProtocolError("the round's LoRA spec needs target_modules as a list of names")
        rank = int(fields["rank"])
        if rank < 1:
            raise ProtocolError(f"the round's LoRA rank must be positive, got {rank}")
        names = tuple(str(t) for t in targets)
        return cls(rank, float(fields["alpha"]), float(fields["dropout"]), names)


def adapter_to_record(state: AdapterState) -> ArrayRecord:
    """An adapter (or delta) as an ArrayRecord, fp32 (Flower refuses bf16)."""
    return ArrayRecord({name: tensor.to(torch.float32) for name, tensor in state.items()})


def check_adapter_layout(state: AdapterState, *, like: AdapterState, what: str) -> None:
    """Raise unless ``state`` has ``like``'s tensor names and shapes, fp32 and finite values."""
    received = set(state)
    expected = set(like)
    if received != expected:
        missing = sorted(expected - received)[:3]
        unexpected = sorted(received - expected)[:3]
        raise ProtocolError(
            f"{what}: tensor names differ from the global adapter "
            f"(missing {missing}, unexpected {unexpected})"
        )
    for name in sorted(expected):
        tensor = state[name]
        if tensor.dtype != torch.float32:
            raise ProtocolError(
                f"{what}: tensor {name!r} has dtype {tensor.dtype}, expected float32"
            )
        if tuple(tensor.shape) != tuple(like[name].shape):
            raise ProtocolError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(like[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ProtocolError(f"{what}: tensor {name!r} contains NaN or infinity")


def adapter_from_record(record: ArrayRecord, *, like: AdapterState, what: str) -> AdapterState:
    """Decode and validate an adapter against the expected names, shapes and dtype.

    Everything is checked before anything is returned, so a malformed adapter is rejected
    whole, never half-applied.
    """
    state: AdapterState = {}
    for name in record:
        array = record[name].numpy()
        if str(array.dtype) != "float32":
            raise ProtocolError(
                f"{what}: tensor {name!r} has dtype {array.dtype}, expected float32"
            )
        state[name] = torch.from_numpy(array.copy())
    check_adapter_layout(state, like=like, what=what)
    return state


def adapter_from_payload(payload: bytes, *, like: AdapterState, what: str) -> AdapterState:
    """Parse an update's safetensors bytes and check its layout against ``like``."""
    try:
        state = adapter_from_bytes(payload)
    except ModelError as error:
        raise ProtocolError(f"{what}: {error}") from None
    check_adapter_layout(state, like=like, what=what)
    return state


def train_instruction(
    global_record: ArrayRecord,
    task: RoundTask,
    dp: DpTask | None = None,
    lora: LoraSpec | None = None,
) -> RecordDict:
    """The content of a train message.

    ``global_record`` is :func:`adapter_to_record` of the global adapter; a round builds it
    once and every site's message shares it (records are copied on delivery, never mutated).
    """
    content = RecordDict({GLOBAL_KEY: global_record, TASK_KEY: task.to_record()})
    if dp is not None:
        content[DP_KEY] = dp.to_record()
    if lora is not None:
        content[LORA_KEY] = lora.to_record()
    return content


_BINDING_KINDS: dict[str, type] = {
    "federation_id": str,
    "run_id": str,
    "round": int,
    "stage": str,
    "site_id": str,
    "payload_sha256": str,
}


def _typed_fields(
    record: Mapping[str, object], kinds: dict[str, type], *, what: str
) -> dict[str, str | int | float]:
    values = dict(record)
    wrong = [
        name
        for name, kind in kinds.items()
        if not isinstance(values.get(name), kind) or isinstance(values.get(name), bool)
    ]
    if wrong:
        raise ProtocolError(f"{what} lacks or mistypes the fields {wrong}")
    return {name: values[name] for name in kinds}  # type: ignore[misc]


def _signature_field(record: ConfigRecord, *, what: str) -> bytes:
    text = record.get("signature")
    if not isinstance(text, str):
        raise ProtocolError(f"{what} carries no signature")
    try:
        return decode_signature(text)
    except SignatureError as error:
        raise ProtocolError(f"{what}: {error}") from None


def binding_to_record(binding: UpdateBinding, signature: bytes) -> ConfigRecord:
    """A site's signed binding of its update, as sent with the update."""
    fields: dict[str, ConfigRecordValues] = {
        **binding.fields(),
        "signature": encode_signature(signature),
    }
    return ConfigRecord(fields)


def binding_from_record(record: ConfigRecord) -> tuple[UpdateBinding, bytes]:
    """The binding a site claims to have signed, and the signature (not yet verified)."""
    fields = _typed_fields(record, _BINDING_KINDS, what="the update's signed binding")
    return UpdateBinding(**fields), _signature_field(record, what="the update")  # type: ignore[arg-type]


def receipt_to_record(receipt: Receipt, signature: bytes) -> RecordDict:
    """The content of a receipt message from the coordinator to a site."""
    fields: dict[str, ConfigRecordValues] = {
        **receipt.fields(),
        "signature": encode_signature(signature),
    }
    return RecordDict({RECEIPT_KEY: ConfigRecord(fields)})


def receipt_from_record(content: RecordDict) -> tuple[Receipt, bytes]:
    """A receipt as received by a site (not yet verified)."""
    if RECEIPT_KEY not in content.config_records:
        raise ProtocolError("the receipt message holds no receipt")
    record = content.config_records[RECEIPT_KEY]
    binding = UpdateBinding(**_typed_fields(record, _BINDING_KINDS, what="the receipt"))  # type: ignore[arg-type]
    position = _typed_fields(record, {"ledger_seq": int, "entry_hash": str}, what="the receipt")
    receipt = Receipt(
        binding=binding,
        ledger_seq=int(position["ledger_seq"]),
        entry_hash=str(position["entry_hash"]),
    )
    return receipt, _signature_field(record, what="the receipt")


def payload_to_record(payload: bytes) -> ArrayRecord:
    """The update's exact bytes as a one-array record (uint8, chunked by Flower in transit)."""
    return ArrayRecord({PAYLOAD_ARRAY: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def payload_from_record(record: ArrayRecord, *, max_bytes: int, what: str) -> bytes:
    """The exact bytes a site sent, refusing anything but one 1-D uint8 array of bounded size."""
    if list(record.keys()) != [PAYLOAD_ARRAY]:
        raise ProtocolError(f"{what}: expected one array {PAYLOAD_ARRAY!r}, got {list(record)[:3]}")
    array = record[PAYLOAD_ARRAY]
    if array.dtype != "uint8":
        raise ProtocolError(f"{what}: payload dtype is {array.dtype}, expected uint8")
    if len(array.shape) != 1:
        raise ProtocolError(f"{what}: payload shape is {array.shape}, expected one dimension")
    size = array.shape[0]
    if size > max_bytes:
        raise ProtocolError(f"{what}: payload of {size} bytes exceeds the maximum of {max_bytes}")
    return bytes(array.numpy().tobytes())


def train_reply(
    payload: bytes,
    metrics: SiteMetrics,
    binding: UpdateBinding,
    signature: bytes,
    dp_event: Mapping[str, str | int | float] | None = None,
) -> RecordDict:
    """The content of a site's reply to a train message (with its DP event when private)."""
    content = RecordDict(
        {
            UPDATE_KEY: payload_to_record(payload),
            METRICS_KEY: metrics.to_record(),
            SITE_KEY: binding_to_record(binding, signature),
        }
    )
    if dp_event is not None:
        content[DP_EVENT_KEY] = ConfigRecord(dict(dp_event))
    return content

"""What travels between the server and the sites, as typed Flower records.

Down (server -> site): the global adapter (ArrayRecord "global") and the round task
(ConfigRecord "task"). Up (site -> server): the adapter delta (ArrayRecord "update") and
aggregate numbers (MetricRecord "metrics"). Arrays travel as numpy buffers that Flower decodes
with ``allow_pickle=False``; nothing here is ever unpickled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsilo.model.adapters import AdapterState

GLOBAL_KEY = "global"
TASK_KEY = "task"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
SITE_KEY = "site"


class ProtocolError(ValueError):
    """A message that does not have the expected shape; names the record and field."""


@dataclass(frozen=True)
class RoundTask:
    """The instructions for one site in one round."""

    run_name: str
    round: int
    base_model_hash: str
    local_steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    max_grad_norm: float  # 0 means no clipping
    proximal_mu: float
    seed: int

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
        return cls(**kwargs)  # type: ignore[arg-type]


_FIELD_KINDS: dict[str, type] = {
    "run_name": str,
    "round": int,
    "base_model_hash": str,
    "local_steps": int,
    "batch_size": int,
    "learning_rate": float,
    "max_length": int,
    "max_grad_norm": float,
    "proximal_mu": float,
    "seed": int,
}


@dataclass(frozen=True)
class SiteMetrics:
    """Aggregate numbers a site reports with its update (no per-example values)."""

    num_examples: int
    train_loss: float
    tokens: int
    seconds: float

    def to_record(self) -> MetricRecord:
        return MetricRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: MetricRecord) -> SiteMetrics:
        try:
            num_examples = record["num_examples"]
            train_loss = record["train_loss"]
            tokens = record["tokens"]
            seconds = record["seconds"]
        except KeyError as error:
            raise ProtocolError(f"site metrics are missing {error.args[0]!r}") from None
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise ProtocolError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not isinstance(train_loss, float | int) or not math.isfinite(train_loss):
            raise ProtocolError(f"train_loss must be a finite number, got {train_loss!r}")
        if not isinstance(tokens, int) or not isinstance(seconds, float | int):
            raise ProtocolError("tokens must be an integer and seconds a number")
        return cls(num_examples, float(train_loss), tokens, float(seconds))


def adapter_to_record(state: AdapterState) -> ArrayRecord:
    """An adapter (or delta) as an ArrayRecord, fp32 (Flower refuses bf16)."""
    return ArrayRecord({name: tensor.to(torch.float32) for name, tensor in state.items()})


def adapter_from_record(record: ArrayRecord, *, like: AdapterState, what: str) -> AdapterState:
    """Decode and validate an adapter against the expected names, shapes and dtype.

    Everything is checked before anything is returned, so a malformed update is rejected
    whole, never half-applied.
    """
    received = set(record.keys())
    expected = set(like.keys())
    if received != expected:
        missing = sorted(expected - received)[:3]
        unexpected = sorted(received - expected)[:3]
        raise ProtocolError(
            f"{what}: tensor names differ from the global adapter "
            f"(missing {missing}, unexpected {unexpected})"
        )
    state: AdapterState = {}
    for name in sorted(expected):
        array = record[name].numpy()
        if str(array.dtype) != "float32":
            raise ProtocolError(
                f"{what}: tensor {name!r} has dtype {array.dtype}, expected float32"
            )
        tensor = torch.from_numpy(array.copy())
        if tuple(tensor.shape) != tuple(like[name].shape):
            raise ProtocolError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(like[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ProtocolError(f"{what}: tensor {name!r} contains NaN or infinity")
        state[name] = tensor
    return state


def train_instruction(global_state: AdapterState, task: RoundTask) -> RecordDict:
    """The content of a train message."""
    return RecordDict({GLOBAL_KEY: adapter_to_record(global_state), TASK_KEY: task.to_record()})


def train_reply(delta: AdapterState, metrics: SiteMetrics, *, site: str) -> RecordDict:
    """The content of a site's reply to a train message."""
    return RecordDict(
        {
            UPDATE_KEY: adapter_to_record(delta),
            METRICS_KEY: metrics.to_record(),
            SITE_KEY: ConfigRecord({"name": site}),
        }
    )

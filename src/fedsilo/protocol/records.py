"""What travels between the server and the sites, as typed Flower records.

Down (server -> site): the global adapter (ArrayRecord "global") and the round task
(ConfigRecord "task"). Up (site -> server): the adapter delta as the exact safetensors bytes the
site signed (ArrayRecord "update", one uint8 array, so Flower can chunk it), aggregate numbers
(MetricRecord "metrics"), the site's signed binding (ConfigRecord "site"), the policy it
trained under, signed with the update's binding (ConfigRecord "policy", :class:`SignedPolicy`),
and the site's signature on the digest of its metrics and DP event (ConfigRecord "claims",
:class:`SignedClaims`).
Arrays travel as numpy buffers, read by :func:`decode_array` (bounded, header parsed strictly,
never ``np.load``); nothing here is ever unpickled. Every decoder raises :class:`ProtocolError`
and nothing else, and bounds every number it returns (``tests/protocol/test_decoder_fuzz.py``).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from tokenize import TokenError
from typing import get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy_format

from fedsilo.config import LoraSection
from fedsilo.config.schema import (
    MAX_RECORD_NOISE_MULTIPLIER,
    MAX_ROUNDS,
    MIN_RECORD_NOISE_MULTIPLIER,
)
from fedsilo.crypto import (
    Receipt,
    SignatureError,
    UpdateBinding,
    decode_signature,
    encode_signature,
)
from fedsilo.model.adapters import AdapterState, adapter_from_bytes
from fedsilo.model.base import ModelError
from fedsilo.privacy.accounting import AccountantName
from fedsilo.protocol.schedule import local_steps_for

GLOBAL_KEY = "global"
TASK_KEY = "task"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
DP_KEY = "dp"
LORA_KEY = "lora"
DP_EVENT_KEY = "dp_event"
SITE_KEY = "site"
POLICY_KEY = "policy"
CLAIMS_KEY = "claims"
RECEIPT_KEY = "receipt"
PAYLOAD_ARRAY = "safetensors"
TRAIN_STAGE = "train"
TRAIN_MESSAGE = "train"
RECEIPT_MESSAGE = "query.receipt"


class ProtocolError(ValueError):
    """A message that does not have the expected shape; names the record and field."""


# Bounds on what a peer may declare, checked before a value is used. A count of examples or
# tokens above 2**53 cannot even be weighted exactly in float64; no site holds that many.
MAX_COUNT = 2**53
MAX_SEED = 2**64
MAX_SECONDS = 1e9  # ~31 years of local training
MAX_LOSS = 1e6  # a cross-entropy far beyond any model's: a larger one is a lie or a blow-up
MAX_LENGTH_TOKENS = 1 << 20
MAX_MIN_COHORT = 1_000_000  # far more sites than any federation has
NO_POLICY = "none"  # a site's declared policy digest when it trains without a policy

# The names the coordinator chooses for a run and a stage: a site writes both into its own
# storage (receipt folders and file names, its privacy-spent record), so both must be plain.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
STAGE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# The longest federation id, run name or base model hash a round task may carry: far beyond
# any real one ("sha256:" and 64 hex digits; names of at most 64 characters in the config).
MAX_NAME_CHARS = 256


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
        task = cls(**kwargs)  # type: ignore[arg-type]
        task._check_ranges()
        return task

    def _check_ranges(self) -> None:
        check_run_id(self.run_id, what="round task")
        if not STAGE_PATTERN.fullmatch(self.stage):
            raise ProtocolError(f"round task field 'stage' {self.stage[:80]!r} is not a plain name")
        for name in ("federation_id", "run_name", "base_model_hash"):
            _check_text(getattr(self, name), name, what="round task")
        positive = {
            "round": self.round,
            "cohort_size": self.cohort_size,
            "batch_size": self.batch_size,
        }
        for name, count in positive.items():
            _check_int(count, name, low=1, high=MAX_COUNT, what="round task")
        # One of the two is 0 (checked above): the other sets the local work.
        _check_int(self.local_steps, "local_steps", low=0, high=MAX_COUNT, what="round task")
        _check_float(self.local_epochs, "local_epochs", low=0.0, high=1000.0, what="round task")
        _check_int(self.max_length, "max_length", low=1, high=MAX_LENGTH_TOKENS, what="round task")
        _check_int(self.seed, "seed", low=0, high=MAX_SEED - 1, what="round task")
        _check_float(self.learning_rate, "learning_rate", low=0.0, high=1.0, what="round task")
        _check_float(self.max_grad_norm, "max_grad_norm", low=0.0, what="round task")
        _check_float(self.proximal_mu, "proximal_mu", low=0.0, what="round task")
        if self.learning_rate <= 0:
            raise ProtocolError("round task field 'learning_rate' must be > 0")


def check_run_id(run_id: str, *, what: str) -> None:
    """Raise ProtocolError unless ``run_id`` is a plain name (:data:`RUN_ID_PATTERN`)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ProtocolError(
            f"{what} field 'run_id' {run_id[:80]!r} (of {len(run_id)} characters) is not a "
            f"plain name of at most 128 letters, digits, '_' or '-'"
        )


def _check_text(value: str, name: str, *, what: str) -> None:
    if not 0 < len(value) <= MAX_NAME_CHARS:
        raise ProtocolError(
            f"{what} field {name!r} must hold 1 to {MAX_NAME_CHARS} characters, got {len(value)}"
        )


def _check_int(value: int, name: str, *, low: int, high: int, what: str) -> None:
    if not low <= value <= high:
        raise ProtocolError(f"{what} field {name!r} must be in [{low}, {high}], got {value}")


def _check_float(value: float, name: str, *, low: float, high: float = math.inf, what: str) -> None:
    """Refuse NaN, infinity and values outside [low, high]."""
    if not (math.isfinite(value) and low <= value <= high):
        raise ProtocolError(f"{what} field {name!r} must be finite and in [{low}, {high}]")


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

    def claim_fields(self) -> dict[str, str | int | float | None]:
        """The metrics as the site signs them (:func:`fedsilo.crypto.claims_sha256`) and the
        ledger keeps them: every field by name, an absent one as None, the counts as integers
        and ``train_loss``, ``seconds`` and ``padding_share`` as floats."""
        return {
            "num_examples": int(self.num_examples),
            "train_loss": None if self.train_loss is None else float(self.train_loss),
            "tokens": int(self.tokens),
            "seconds": float(self.seconds),
            "precision": self.precision,
            "padding_share": None if self.padding_share is None else float(self.padding_share),
        }

    @classmethod
    def from_record(cls, record: MetricRecord, *, max_examples: int = MAX_COUNT) -> SiteMetrics:
        """Decode and bound a site's numbers; ``max_examples`` caps the count it may claim."""
        try:
            num_examples = record["num_examples"]
            train_loss = record.get("train_loss")
            tokens = record["tokens"]
            seconds = record["seconds"]
        except KeyError as error:
            raise ProtocolError(f"site metrics are missing {error.args[0]!r}") from None
        what = "site metrics"
        if not isinstance(num_examples, int) or isinstance(num_examples, bool):
            raise ProtocolError(f"num_examples must be a positive integer, got {num_examples!r}")
        if not 1 <= num_examples <= max_examples:
            raise ProtocolError(
                f"num_examples must be between 1 and the federation's maximum of "
                f"{max_examples}, got {num_examples}"
            )
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise ProtocolError("tokens must be an integer")
        _check_int(tokens, "tokens", low=0, high=MAX_COUNT, what=what)
        if isinstance(seconds, bool) or not isinstance(seconds, float | int):
            raise ProtocolError("seconds must be a number")
        _check_float(float(seconds), "seconds", low=0.0, high=MAX_SECONDS, what=what)
        if train_loss is not None:
            if isinstance(train_loss, bool) or not isinstance(train_loss, float | int):
                raise ProtocolError(f"train_loss must be a finite number, got {train_loss!r}")
            if not math.isfinite(train_loss):
                raise ProtocolError(f"train_loss must be a finite number, got {train_loss!r}")
            _check_float(float(train_loss), "train_loss", low=0.0, high=MAX_LOSS, what=what)
        bits = record.get("precision_bits")
        precision = None
        if bits is not None:
            by_bits = {value: name for name, value in _PRECISION_BITS.items()}
            if isinstance(bits, bool) or not isinstance(bits, int) or bits not in by_bits:
                raise ProtocolError(f"precision_bits must be 16 or 32, got {bits!r}")
            precision = by_bits[bits]
        padding = record.get("padding_share")
        if padding is not None:
            if isinstance(padding, bool) or not isinstance(padding, float | int):
                raise ProtocolError(f"padding_share must be a number, got {padding!r}")
            _check_float(float(padding), "padding_share", low=0.0, high=1.0, what=what)
            if tokens > 0 and padding >= 1.0:
                raise ProtocolError(
                    f"{what}: padding_share 1 with {tokens} tokens processed (a share of 1 "
                    f"means no token was)"
                )
        loss = None if train_loss is None else float(train_loss)
        share = None if padding is None else float(padding)
        return cls(num_examples, loss, tokens, float(seconds), precision, share)


@dataclass(frozen=True)
class PolicyDeclaration:
    """The policy a site trained an update under, as it declares with every update it sends.

    ``policy_sha256`` is the sha256 (64 lowercase hex digits) of the site's canonical policy
    (:func:`fedsilo.client.policy.policy_digest`), None for a site without one (sent as
    ``"none"``); ``min_cohort`` is the smallest cohort the site accepts (1 without a policy).
    Neither depends on the site's records, so a site under differential privacy may release
    them. The site signs the declaration together with the update's binding
    (:class:`SignedPolicy`); the coordinator ledgers both in the ``update_received`` entry.
    """

    policy_sha256: str | None
    min_cohort: int

    def __post_init__(self) -> None:
        what = "the site's policy declaration"
        digest = self.policy_sha256
        if digest is not None and (len(digest) != 64 or digest.strip("0123456789abcdef")):
            raise ProtocolError(
                f"{what}: policy_sha256 must be 64 lowercase hex digits or {NO_POLICY!r}, "
                f"got {digest[:80]!r}"
            )
        _check_int(self.min_cohort, "min_cohort", low=1, high=MAX_MIN_COHORT, what=what)

    def fields(self) -> dict[str, str | int]:
        """The declaration as sent and as ledgered (the absent policy as ``"none"``)."""
        return {
            "policy_sha256": NO_POLICY if self.policy_sha256 is None else self.policy_sha256,
            "min_cohort": self.min_cohort,
        }

    @classmethod
    def from_fields(cls, values: Mapping[str, object]) -> PolicyDeclaration:
        """Decode and bound a declaration's two fields (from a reply or a ledger entry)."""
        what = "the site's policy declaration"
        if set(values) != {"policy_sha256", "min_cohort"}:
            raise ProtocolError(
                f"{what} must hold exactly policy_sha256 and min_cohort, got {sorted(values)[:4]}"
            )
        fields = _typed_fields(values, {"policy_sha256": str, "min_cohort": int}, what=what)
        digest = str(fields["policy_sha256"])
        return cls(None if digest == NO_POLICY else digest, int(fields["min_cohort"]))


@dataclass(frozen=True)
class SignedPolicy:
    """A site's policy declaration with its signature over it and the update's binding
    (:func:`fedsilo.crypto.sign_policy_declaration`): it travels as ConfigRecord "policy" and
    is ledgered, as :meth:`ledger_fields`, in the update's ``update_received`` entry."""

    declaration: PolicyDeclaration
    signature: bytes

    def ledger_fields(self) -> dict[str, str | int]:
        return {**self.declaration.fields(), "signature": encode_signature(self.signature)}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(self.ledger_fields()))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SignedPolicy:
        """The declaration and signature a site claims (the signature not yet verified)."""
        what = "the site's policy declaration"
        values = {name: value for name, value in record.items() if name != "signature"}
        return cls(PolicyDeclaration.from_fields(values), _signature_field(record, what=what))


@dataclass(frozen=True)
class SignedClaims:
    """The digest of what a site claims with an update, its metrics and DP event
    (:func:`fedsilo.crypto.claims_sha256`), and the site's signature over it and the update's
    binding (:func:`fedsilo.crypto.sign_claims`): it travels as ConfigRecord "claims" and is
    ledgered, as :meth:`ledger_fields`, in the update's ``update_received`` entry."""

    claims_sha256: str
    signature: bytes

    def ledger_fields(self) -> dict[str, str | int]:
        return {"claims_sha256": self.claims_sha256, "signature": encode_signature(self.signature)}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(self.ledger_fields()))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SignedClaims:
        """The digest and signature a site claims (the signature not yet verified)."""
        what = "the site's signed claims"
        if set(record) != {"claims_sha256", "signature"}:
            raise ProtocolError(
                f"{what} must hold exactly claims_sha256 and signature, got {sorted(record)[:4]}"
            )
        digest = record["claims_sha256"]
        if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise ProtocolError(f"{what}: claims_sha256 must be 64 lowercase hex digits")
        return cls(digest, _signature_field(record, what=what))


@dataclass(frozen=True)
class DpTask:
    """Record-level DP-SGD settings sent with a round (absent: no differential privacy)."""

    noise_multiplier: float  # 0 means: calibrate to target_epsilon
    target_epsilon: float  # 0 means: use noise_multiplier
    max_grad_norm: float
    delta: float
    accountant: AccountantName
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
            name: _int_as_float(v) if kind is float else v
            for name, kind in kinds.items()
            if (v := record.get(name)) is not None
        }
        what = "the round's DP settings"
        task = cls(**_typed_fields(values, kinds, what=what))  # type: ignore[arg-type]
        # 0 (calibrate to target_epsilon) or the range a site's DP event may declare
        # (server.admission): outside it the accountants cannot compose the event (0.03 made
        # PLD ask for gigabytes before the budget check could refuse the task).
        noise_low = MIN_RECORD_NOISE_MULTIPLIER if task.noise_multiplier > 0 else 0.0
        _check_float(
            task.noise_multiplier,
            "noise_multiplier",
            low=noise_low,
            high=MAX_RECORD_NOISE_MULTIPLIER,
            what=what,
        )
        _check_float(task.target_epsilon, "target_epsilon", low=0.0, high=1e6, what=what)
        _check_float(task.max_grad_norm, "max_grad_norm", low=0.0, high=1e6, what=what)
        _check_float(task.delta, "delta", low=0.0, high=1.0, what=what)
        _check_int(task.planned_rounds, "planned_rounds", low=1, high=MAX_ROUNDS, what=what)
        if task.accountant not in get_args(AccountantName):
            raise ProtocolError(
                f"{what}: accountant {task.accountant[:80]!r} is not one of "
                f"{list(get_args(AccountantName))}"
            )
        if task.max_grad_norm <= 0 or not 0 < task.delta < 1:
            raise ProtocolError(f"{what}: max_grad_norm must be > 0 and delta in (0, 1)")
        if (task.noise_multiplier > 0) == (task.target_epsilon > 0):
            raise ProtocolError(f"{what}: give exactly one of noise_multiplier, target_epsilon")
        return task


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
            "alpha": _int_as_float(record.get("alpha")),
            "dropout": _int_as_float(record.get("dropout")),
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
        what = "the round's LoRA spec"
        rank, alpha, dropout = int(fields["rank"]), float(fields["alpha"]), float(fields["dropout"])
        _check_int(rank, "rank", low=1, high=4096, what=what)
        _check_float(alpha, "alpha", low=0.0, high=1e6, what=what)
        _check_float(dropout, "dropout", low=0.0, high=1.0, what=what)
        if alpha <= 0 or dropout >= 1:
            raise ProtocolError(f"{what}: alpha must be > 0 and dropout below 1")
        if len(targets) > 1024 or any(not 0 < len(str(t)) <= 256 for t in targets):
            raise ProtocolError(f"{what}: target_modules must be at most 1024 short names")
        return cls(rank, alpha, dropout, tuple(str(t) for t in targets))


def adapter_to_record(state: AdapterState) -> ArrayRecord:
    """An adapter (or delta) as an ArrayRecord, fp32 (Flower refuses bf16)."""
    return ArrayRecord({name: tensor.to(torch.float32) for name, tensor in state.items()})


# The largest magnitude an adapter or update value may have when it crosses a process boundary.
# LoRA weights and their per-round changes are of order 1e-2 to 1 at any sane learning rate; a
# bound far above that still keeps every sum, mean, momentum and FedAdam square of accepted
# values finite in float32, so no single reply can overflow the global adapter.
MAX_ADAPTER_VALUE = 1e4


def check_adapter_values(values: np.ndarray | torch.Tensor, *, count: int = 1, what: str) -> None:
    """Raise unless every value is finite and at most ``count`` x :data:`MAX_ADAPTER_VALUE` in
    magnitude (``count``: how many updates were summed into ``values``)."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    if not np.isfinite(array).all():
        raise ProtocolError(f"{what}: contains NaN or infinity")
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > count * MAX_ADAPTER_VALUE:
        raise ProtocolError(
            f"{what}: holds a value of magnitude {largest:.3g}, above the bound "
            f"{count * MAX_ADAPTER_VALUE:g} no LoRA update reaches (a diverged or hostile site)"
        )


def check_adapter_layout(state: AdapterState, *, like: AdapterState, what: str) -> None:
    """Raise unless ``state`` has ``like``'s tensor names and shapes, fp32 values, finite and
    within :data:`MAX_ADAPTER_VALUE`."""
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
        check_adapter_values(tensor, what=f"{what}: tensor {name!r}")


def adapter_from_record(record: ArrayRecord, *, like: AdapterState, what: str) -> AdapterState:
    """Decode and validate an adapter against the expected names, shapes and dtype.

    Each array's bytes are bounded by the size its tensor in ``like`` has before they are
    read, and everything is checked before anything is returned, so a malformed adapter is
    rejected whole, never half-applied.
    """
    names = list(record.keys())
    if sorted(names) != sorted(like):
        missing = sorted(set(like) - set(names))[:3]
        unexpected = sorted(set(names) - set(like))[:3]
        raise ProtocolError(
            f"{what}: tensor names differ from the global adapter "
            f"(missing {missing}, unexpected {unexpected})"
        )
    state: AdapterState = {}
    for name in names:
        expected = tuple(like[name].shape)
        array = decode_array(
            record[name], dtype="float32", max_values=math.prod(expected), what=f"{what}: {name!r}"
        )
        if array.shape != expected:
            raise ProtocolError(
                f"{what}: tensor {name!r} has shape {array.shape}, expected {expected}"
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


def round_task_from_content(content: RecordDict, *, what: str = "the train message") -> RoundTask:
    """The round task a message carries (ConfigRecord "task"), decoded and bounded."""
    if TASK_KEY not in content.config_records:
        raise ProtocolError(f"{what} carries no round task (no {TASK_KEY!r} config record)")
    return RoundTask.from_record(content.config_records[TASK_KEY])


def global_record_from_content(
    content: RecordDict, *, what: str = "the train message"
) -> ArrayRecord:
    """The global adapter record a message carries (ArrayRecord "global"), not yet decoded."""
    if GLOBAL_KEY not in content.array_records:
        raise ProtocolError(f"{what} carries no global adapter (no {GLOBAL_KEY!r} array record)")
    return content.array_records[GLOBAL_KEY]


_BINDING_KINDS: dict[str, type] = {
    "federation_id": str,
    "run_id": str,
    "round": int,
    "stage": str,
    "site_id": str,
    "payload_sha256": str,
}


def _int_as_float(value: object) -> object:
    """An integer where a float is expected (records keep 1.0 as 1), as a float; a boolean,
    though an int to Python, stays a boolean for the type check to refuse."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


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
    """The exact bytes a site sent, refusing anything but one 1-D uint8 array of bounded size.

    The bound applies to the bytes that arrived, not to the shape the record declares.
    """
    if list(record.keys()) != [PAYLOAD_ARRAY]:
        raise ProtocolError(f"{what}: expected one array {PAYLOAD_ARRAY!r}, got {list(record)[:3]}")
    array = decode_array(record[PAYLOAD_ARRAY], dtype="uint8", max_values=max_bytes, what=what)
    if array.ndim != 1:
        raise ProtocolError(f"{what}: payload shape is {array.shape}, expected one dimension")
    return array.tobytes()


def check_array_size(array: Array, *, dtype: str, max_values: int, what: str) -> None:
    """Refuse an array whose bytes could not hold at most ``max_values`` of ``dtype``.

    This looks at the length of the bytes that arrived and nothing else, so it is the first
    check any array from a peer passes, before anything in it is read.
    """
    data = getattr(array, "data", None)
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what}: the array carries no bytes")
    limit = NPY_HEADER_MAX + max_values * np.dtype(dtype).itemsize
    if len(data) > limit:
        raise ProtocolError(
            f"{what}: payload of {len(data)} bytes exceeds the maximum of "
            f"{max_values * np.dtype(dtype).itemsize}"
        )


# numpy writes a 128-byte header for these arrays; a longer one is refused before it is read.
NPY_HEADER_MAX = 4096
_NPY_HEADERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}


def decode_array(array: Array, *, dtype: str, max_values: int, what: str) -> np.ndarray:
    """A Flower array's values, trusting nothing it declares (read-only view of its bytes).

    The bytes are bounded first; then the numpy header is parsed (never unpickled), its dtype
    must be exactly ``dtype`` (little-endian), its element count must match the bytes that
    follow it, and the dtype and shape the record declares must agree with what is inside.
    """
    check_array_size(array, dtype=dtype, max_values=max_values, what=what)
    if array.stype != SType.NUMPY:
        raise ProtocolError(f"{what}: serialization {array.stype!r} is not {SType.NUMPY!r}")
    data = array.data
    stream = io.BytesIO(data)
    try:
        read_header = _NPY_HEADERS.get(npy_format.read_magic(stream))
        if read_header is None:
            raise ValueError("unsupported .npy version")
        shape, fortran_order, found = read_header(stream, max_header_size=NPY_HEADER_MAX)
    # numpy parses the header with ast and, for old headers, tokenize: each has its own errors.
    except (ValueError, TypeError, SyntaxError, OverflowError, TokenError) as error:
        raise ProtocolError(f"{what}: not a numpy array ({error})") from None
    wanted = np.dtype(dtype).newbyteorder("<")
    if found != wanted:
        raise ProtocolError(f"{what}: has dtype {found}, expected {dtype}")
    if any(size < 0 for size in shape):
        raise ProtocolError(f"{what}: negative dimension in shape {shape}")
    count = math.prod(shape)
    held = len(data) - stream.tell()
    if count > max_values or count * wanted.itemsize != held:
        raise ProtocolError(
            f"{what}: header declares shape {tuple(shape)} ({count} values of {dtype}, at most "
            f"{max_values}), the array holds {held} bytes"
        )
    if str(array.dtype) != str(found) or tuple(array.shape) != tuple(shape):
        raise ProtocolError(
            f"{what}: the record declares {array.dtype} {tuple(array.shape)}, the array is "
            f"{found} {tuple(shape)}"
        )
    flat = np.frombuffer(data, dtype=wanted, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def train_reply(
    payload: bytes,
    metrics: SiteMetrics,
    binding: UpdateBinding,
    signature: bytes,
    policy: SignedPolicy,
    claims: SignedClaims,
    dp_event: Mapping[str, str | int | float] | None = None,
) -> RecordDict:
    """The content of a site's reply to a train message (with its DP event when private)."""
    content = RecordDict(
        {
            UPDATE_KEY: payload_to_record(payload),
            METRICS_KEY: metrics.to_record(),
            SITE_KEY: binding_to_record(binding, signature),
            POLICY_KEY: policy.to_record(),
            CLAIMS_KEY: claims.to_record(),
        }
    )
    if dp_event is not None:
        content[DP_EVENT_KEY] = ConfigRecord(dict(dp_event))
    return content

"""Every decoder of what crosses a process or machine boundary, fuzzed: random bytes,
truncations, byte flips and insertions of valid inputs, deep nesting, huge numbers, NaN and
infinity, wrong types, shapes and dtypes. The only exception a decoder may raise is its module's
typed error; anything else (RecursionError, MemoryError, a bare ValueError from a library)
would escape the round that called it.

The normal suite runs a few dozen inputs per decoder; ``-m slow`` runs many more.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from fedsilo.crypto import SignatureError, decode_signature
from fedsilo.privacy.events import event_from_json
from fedsilo.privacy.he import ckks
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.messages import (
    Advertisement,
    SecAggMessageError,
    SecAggParams,
    ShareBundle,
    UnmaskReply,
    decode_sealed_map,
    encode_sealed_map,
)
from fedsilo.privacy.secagg.shamir import ShamirError, Share
from fedsilo.privacy.secagg.site import SiteSession, advertise
from fedsilo.protocol.he_records import DecryptRequest, EncryptRequest, keygen_from_content
from fedsilo.protocol.records import (
    DpTask,
    LoraSpec,
    ProtocolError,
    RoundTask,
    SignedClaims,
    SignedPolicy,
    SiteMetrics,
    adapter_from_payload,
    adapter_from_record,
    binding_from_record,
    payload_from_record,
    receipt_from_record,
)
from fedsilo.protocol.secagg_records import (
    adverts_from_content,
    session_from_content,
    shares_from_content,
    unmask_from_content,
)

TEMPLATE = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.zeros(3, 2)}
SITE, PEER, SESSION = "site-a", "site-b", "fed/run/1/1"

# --- inputs -----------------------------------------------------------------------------------

DEEP = 5000
HOSTILE_TEXT = [
    "[" * DEEP + "]" * DEEP,
    "{" + '"a":{' * DEEP + "}" * (DEEP + 1),
    '{"x":' + "9" * 5000 + "}",
    '{"x":-' + "9" * 5000 + "}",
    '{"x":NaN}',
    '{"x":Infinity}',
    '{"x":1e999}',
    "",
    "null",
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdef", min_size=0, max_size=130),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def with_fields(names: list[str]) -> st.SearchStrategy[bytes]:
    """JSON objects with the expected field names (and sometimes more) and random values."""
    fields = st.fixed_dictionaries({name: json_values for name in names})
    extra = st.dictionaries(st.text(max_size=6), json_values, max_size=2)
    return st.builds(lambda a, b: _json_bytes({**a, **b}), fields, extra)


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, byte flips and insertions of a valid input."""
    size = len(valid)
    flip = st.tuples(st.integers(0, size - 1), st.integers(0, 255)).map(
        lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]
    )
    insert = st.tuples(st.integers(0, size), st.binary(min_size=1, max_size=16)).map(
        lambda t: valid[: t[0]] + t[1] + valid[t[0] :]
    )
    cut = st.integers(0, size).map(lambda n: valid[:n])
    return st.one_of(cut, flip, insert)


def hostile_bytes(valid: bytes, fields: list[str] | None = None) -> st.SearchStrategy[bytes]:
    options = [
        st.binary(max_size=300),
        mutations(valid),
        st.sampled_from([t.encode() for t in HOSTILE_TEXT]),
        json_values.map(_json_bytes),
    ]
    if fields:
        options.append(with_fields(fields))
    return st.one_of(*options)


record_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 2**62, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
    st.lists(st.binary(max_size=8), max_size=3),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
)
metric_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 2**62]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=3),
)


def config_records(valid: dict[str, Any]) -> st.SearchStrategy[ConfigRecord]:
    """The valid record with some fields dropped, retyped or set to hostile values."""
    names = sorted(valid)
    changes = st.dictionaries(st.sampled_from([*names, "extra"]), record_values, max_size=4)
    dropped = st.sets(st.sampled_from(names), max_size=2)
    return st.builds(
        lambda change, drop: ConfigRecord(
            {k: v for k, v in {**valid, **change}.items() if k not in drop}
        ),
        changes,
        dropped,
    )


def _npy(array: np.ndarray, *, pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickle)
    return buffer.getvalue()


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


VALID_PAYLOAD = b"\x01\x02\x03" * 20
npy_data = st.one_of(
    st.binary(max_size=200),
    mutations(_npy(np.frombuffer(VALID_PAYLOAD, dtype=np.uint8))),
    mutations(_npy(np.zeros((2, 3), dtype=np.float32))),
    st.just(_npy(np.array([1, "a"], dtype=object), pickle=True)),
    st.builds(
        lambda descr, shape, tail: _npy_header(descr, shape) + tail,
        st.sampled_from(["|u1", "<f4", ">f4", "<f8", "|O", "<U3", "|V4", "|b1"]),
        st.lists(st.integers(-3, 2**41), max_size=3).map(tuple),
        st.binary(max_size=64),
    ),
)
arrays = st.builds(
    lambda dtype, shape, stype, data: Array(dtype=dtype, shape=shape, stype=stype, data=data),
    st.sampled_from(["uint8", "float32", "float64", "object", "int8"]),
    st.lists(st.integers(-2, 2**40), max_size=3).map(tuple),
    st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", ""]),
    npy_data,
)
array_records = st.one_of(
    st.dictionaries(st.sampled_from([*TEMPLATE, "safetensors", "x"]), arrays, max_size=3).map(
        ArrayRecord
    ),
    st.builds(
        lambda name, array: ArrayRecord({**_valid_adapter_record(), name: array}),
        st.sampled_from(list(TEMPLATE)),
        arrays,
    ),
)


def _valid_adapter_record() -> dict[str, Array]:
    return {name: Array(np.zeros(tuple(t.shape), dtype=np.float32)) for name, t in TEMPLATE.items()}


def _session_bytes() -> bytes:
    params = SecAggParams(
        threshold=2, cohort_size=3, clip=1.0, dp_clip_norm=0.0, dp_noise_multiplier=0.0
    )
    session = advertise(site=SITE, session=SessionId("fed", "run", 1, 1), params=params)
    return session.to_bytes()


def _task_fields() -> dict[str, Any]:
    return {
        "federation_id": "fed",
        "run_id": "run",
        "stage": "train",
        "run_name": "r",
        "round": 1,
        "cohort_size": 3,
        "base_model_hash": "sha256:00",
        "local_steps": 2,
        "batch_size": 2,
        "learning_rate": 0.01,
        "max_length": 64,
        "max_grad_norm": 1.0,
        "proximal_mu": 0.0,
        "seed": 5,
    }


BINDING = {
    "federation_id": "fed",
    "run_id": "run",
    "round": 1,
    "stage": "train",
    "site_id": SITE,
    "payload_sha256": "0" * 64,
    "signature": "A" * 86 + "==",
}
SESSION_FIELDS = {
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


def content(key: str, valid: dict[str, Any]) -> st.SearchStrategy[RecordDict]:
    return config_records(valid).map(lambda record: RecordDict({key: record}))


def frames(valid_parts: list[bytes]) -> st.SearchStrategy[bytes]:
    valid = ckks.frame(valid_parts)
    huge_count = struct.pack("<I", 2**32 - 1)
    huge_part = struct.pack("<I", 1) + struct.pack("<Q", 2**63)
    return st.one_of(hostile_bytes(valid), st.sampled_from([huge_count, huge_part]))


# TenSEAL contexts are slow to make: one small public context, and two valid ciphertexts.
_SECRET = ckks.new_secret_context(4096)
_PUBLIC = ckks.load_context(ckks.public_part(_SECRET), what="test", secret=False)
_CIPHERTEXTS = ckks.encrypt(_PUBLIC, np.arange(2100, dtype=np.float64))
_ZEROS = ckks.encrypted_zeros(_PUBLIC, 2100)
ciphertext_lists = st.lists(
    st.one_of(st.sampled_from(_CIPHERTEXTS), mutations(_CIPHERTEXTS[1]), st.binary(max_size=64)),
    max_size=3,
)

# --- the decoders -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoder:
    name: str
    inputs: st.SearchStrategy[Any]
    decode: Callable[[Any], object]
    error: type[Exception] | tuple[type[Exception], ...]


ADVERT = Advertisement(SITE, SESSION, b"\x01" * 32, b"\x02" * 32, b"\x03" * 32).to_payload()
BUNDLE = ShareBundle(SITE, PEER, 1, b"\x04" * 32, b"\x05" * 32).to_bytes()
UNMASK = UnmaskReply({SITE: (1, b"\x06" * 32)}, {PEER: (2, b"\x07" * 32)}).to_payload()
SEALED = encode_sealed_map({PEER: b"\x08" * 40, "site-c": b"\x09" * 40})
SAFETENSORS = save_safetensors({n: torch.ones(t.shape) for n, t in TEMPLATE.items()})

DECODERS = [
    Decoder(
        "Advertisement.from_payload",
        hostile_bytes(
            ADVERT, ["site", "session", "share_public", "mask_public", "self_seed_sha256"]
        ),
        lambda raw: Advertisement.from_payload(raw, site=SITE, session=SESSION),
        SecAggMessageError,
    ),
    Decoder(
        "ShareBundle.from_bytes",
        hostile_bytes(BUNDLE, ["sender", "recipient", "x", "self_seed_share", "mask_key_share"]),
        lambda raw: ShareBundle.from_bytes(raw, sender=SITE, recipient=PEER),
        SecAggMessageError,
    ),
    Decoder(
        "UnmaskReply.from_payload",
        hostile_bytes(UNMASK, ["self_seed_shares", "mask_key_shares"]),
        lambda raw: UnmaskReply.from_payload(raw, site=SITE, survivors={SITE}, dropped={PEER}),
        SecAggMessageError,
    ),
    Decoder(
        "decode_sealed_map",
        hostile_bytes(SEALED, [PEER, "site-c"]),
        lambda raw: decode_sealed_map(raw, site=SITE, recipients={PEER, "site-c"}),
        SecAggMessageError,
    ),
    Decoder(
        "SiteSession.from_bytes",
        hostile_bytes(
            _session_bytes(),
            ["site", "session", "params", "share_key", "mask_key", "self_seed", "peers", "held"],
        ),
        SiteSession.from_bytes,
        SecAggMessageError,
    ),
    Decoder(
        "SecAggParams.from_fields",
        st.dictionaries(st.sampled_from(sorted(SESSION_FIELDS)[4:]), json_values),
        SecAggParams.from_fields,
        SecAggMessageError,
    ),
    Decoder(
        "adapter_from_record",
        array_records,
        lambda record: adapter_from_record(record, like=TEMPLATE, what="adapter"),
        ProtocolError,
    ),
    Decoder(
        "payload_from_record",
        array_records,
        lambda record: payload_from_record(record, max_bytes=1000, what="update"),
        ProtocolError,
    ),
    Decoder(
        "adapter_from_payload",
        hostile_bytes(SAFETENSORS),
        lambda raw: adapter_from_payload(raw, like=TEMPLATE, what="update"),
        ProtocolError,
    ),
    Decoder(
        "RoundTask.from_record",
        config_records(_task_fields()),
        RoundTask.from_record,
        ProtocolError,
    ),
    Decoder(
        "DpTask.from_record",
        config_records(
            {
                "noise_multiplier": 1.0,
                "target_epsilon": 0.0,
                "max_grad_norm": 1.0,
                "delta": 1e-5,
                "accountant": "rdp",
                "planned_rounds": 3,
            }
        ),
        DpTask.from_record,
        ProtocolError,
    ),
    Decoder(
        "LoraSpec.from_record",
        config_records({"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj"]}),
        LoraSpec.from_record,
        ProtocolError,
    ),
    Decoder(
        "SiteMetrics.from_record",
        st.dictionaries(
            st.sampled_from(["num_examples", "train_loss", "tokens", "seconds", "x"]),
            metric_values,
        ).map(MetricRecord),
        SiteMetrics.from_record,
        ProtocolError,
    ),
    Decoder("binding_from_record", config_records(BINDING), binding_from_record, ProtocolError),
    Decoder(
        "SignedPolicy.from_record",
        config_records({"policy_sha256": "ab" * 32, "min_cohort": 2, "signature": "A" * 86 + "=="}),
        SignedPolicy.from_record,
        ProtocolError,
    ),
    Decoder(
        "SignedClaims.from_record",
        config_records({"claims_sha256": "cd" * 32, "signature": "A" * 86 + "=="}),
        SignedClaims.from_record,
        ProtocolError,
    ),
    Decoder(
        "receipt_from_record",
        content("receipt", {**BINDING, "ledger_seq": 3, "entry_hash": "ab"}),
        receipt_from_record,
        ProtocolError,
    ),
    Decoder(
        "session_from_content",
        content("secagg", SESSION_FIELDS),
        session_from_content,
        (ProtocolError, SecAggMessageError),
    ),
    Decoder(
        "adverts_from_content",
        content("adverts", {"sites": [SITE], "payloads": [ADVERT], "signatures": [b"s" * 64]}),
        adverts_from_content,
        ProtocolError,
    ),
    Decoder(
        "shares_from_content",
        content("shares", {"senders": [PEER], "sealed": [b"x" * 40]}),
        shares_from_content,
        ProtocolError,
    ),
    Decoder(
        "unmask_from_content",
        content("unmask", {"survivors": [SITE], "dropped": [PEER]}),
        unmask_from_content,
        ProtocolError,
    ),
    Decoder(
        "keygen_from_content",
        content("he", {"poly_modulus_degree": 8192}),
        keygen_from_content,
        ProtocolError,
    ),
    Decoder(
        "EncryptRequest.from_content",
        content(
            "he",
            {
                "dealer": SITE,
                "dealer_payload": ADVERT,
                "dealer_signature": b"s" * 64,
                "dealer_keys": b"k" * 40,
                "dealer_keys_signature": b"s" * 64,
                "tensors": ["lora_B"],
            },
        ),
        EncryptRequest.from_content,
        ProtocolError,
    ),
    Decoder(
        "DecryptRequest.from_content",
        content(
            "he",
            {
                "contributors": [SITE, PEER],
                "payloads": [b"p" * 8, b"q" * 8],
                "signatures": [b"s" * 64, b"t" * 64],
                "length": 100,
            },
        ),
        DecryptRequest.from_content,
        ProtocolError,
    ),
    Decoder(
        "event_from_json",
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["poisson_gaussian", "sampled_sites_gaussian", "x"]),
                    "noise_multiplier": json_values,
                    "sample_rate": json_values,
                    "steps": json_values,
                }
            ),
        ),
        event_from_json,
        ValueError,
    ),
    Decoder(
        "decode_signature",
        st.one_of(
            st.text(max_size=100),
            st.binary(min_size=60, max_size=68).map(lambda raw: base64.b64encode(raw).decode()),
        ),
        decode_signature,
        SignatureError,
    ),
    Decoder(
        "Share.from_bytes",
        st.tuples(st.integers(), st.binary(max_size=40)),
        lambda point: Share.from_bytes(*point),
        ShamirError,
    ),
    Decoder(
        "ckks.unframe",
        frames([b"header", b"part" * 10, b""]),
        lambda raw: ckks.unframe(raw, what="upload"),
        ckks.HeError,
    ),
    Decoder(
        "ckks.load_context",
        hostile_bytes(ckks.public_part(_SECRET)[:4000]),
        lambda raw: ckks.load_context(raw, what="context", secret=False),
        ckks.HeError,
    ),
    Decoder(
        "ckks.add_all",
        st.one_of(
            st.just([_CIPHERTEXTS, _CIPHERTEXTS[::-1]]),  # a site's own, in reversed order
            st.lists(ciphertext_lists, max_size=3),
        ),
        lambda contributions: ckks.add_all(_PUBLIC, contributions, what="sum"),
        ckks.HeError,
    ),
    Decoder(
        "ckks.check_vector",
        ciphertext_lists,
        lambda chunks: ckks.check_vector(_PUBLIC, chunks, reference=_ZEROS, what="upload"),
        ckks.HeError,
    ),
]


def fuzz(decoder: Decoder, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(decoder.inputs)
    def decode_anything(value: Any) -> None:
        with contextlib.suppress(decoder.error):
            decoder.decode(value)

    decode_anything()


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.name)
def test_decoder_raises_only_its_typed_error(decoder: Decoder) -> None:
    fuzz(decoder, 60)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.name)
def test_decoder_raises_only_its_typed_error_on_many_inputs(decoder: Decoder) -> None:
    fuzz(decoder, 1000)

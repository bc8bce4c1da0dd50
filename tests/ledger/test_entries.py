import hashlib
import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.crypto import decode_signature, encode_signature, verify
from fedsilo.ledger import (
    GENESIS_HASH,
    EntryKind,
    JsonValue,
    compute_entry_hash,
    entry_fields,
    payload_json,
    utc_now,
)
from fedsilo.ledger.entries import sign_entry_hash
from tests.ledger import COORDINATOR_KEY

# The documented recipe applied by hand: canonical JSON of the entry (keys sorted, no spaces,
# non-ASCII as \u escapes), then sha256. The hash was computed with `sha256sum` over this text.
KAT_PAYLOAD: dict[str, JsonValue] = {
    "run_id": "run-1",
    "coordinator": "H\u00f4pital Nord",
    "noise_multiplier": 1.5,
    "sites": ["a", "b"],
    "resumed": False,
    "note": None,
}
KAT_CREATED_AT = "2025-01-01T00:00:00.000000Z"
KAT_CANONICAL = (
    '{"created_at":"2025-01-01T00:00:00.000000Z","kind":"run_started","payload":'
    '{"coordinator":"H\\u00f4pital Nord","noise_multiplier":1.5,"note":null,"resumed":false,'
    '"run_id":"run-1","sites":["a","b"]},"prev_hash":'
    '"0000000000000000000000000000000000000000000000000000000000000000","seq":1}'
)
KAT_HASH = "06af43c1b403d223b2d3f967e33e932c87972aabd71af11f686577ff5cd47135"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def test_known_answer_text_hashes_to_known_hash() -> None:
    assert hashlib.sha256(KAT_CANONICAL.encode("ascii")).hexdigest() == KAT_HASH


def test_entry_hash_matches_known_answer() -> None:
    entry_hash = compute_entry_hash(
        1, EntryKind.RUN_STARTED, KAT_CREATED_AT, KAT_PAYLOAD, GENESIS_HASH
    )

    assert entry_hash == KAT_HASH


def test_entry_hash_matches_recipe_rebuilt_with_json() -> None:
    document = {
        "seq": 7,
        "kind": "update_rejected",
        "created_at": KAT_CREATED_AT,
        "payload": {"z": 1, "a": [1.25, "\u00e9"]},
        "prev_hash": "f" * 64,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    entry_hash = compute_entry_hash(
        7, EntryKind.UPDATE_REJECTED, KAT_CREATED_AT, {"z": 1, "a": [1.25, "\u00e9"]}, "f" * 64
    )

    assert entry_hash == hashlib.sha256(text.encode()).hexdigest()


def test_entry_signature_covers_hash_and_seq_under_ledger_purpose() -> None:
    signature = encode_signature(sign_entry_hash(COORDINATOR_KEY, seq=1, entry_hash=KAT_HASH))

    verify(
        COORDINATOR_KEY.public_key(),
        "ledger-entry",
        {"entry_hash": KAT_HASH, "seq": 1},
        decode_signature(signature),
    )


def test_payload_json_is_sorted_compact_and_ascii() -> None:
    text = payload_json({"b": 1, "a": "\u00e9", "c": [True, None]})

    assert text == '{"a":"\\u00e9","b":1,"c":[true,null]}'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_payload_json_refuses_non_finite_float_naming_the_key(bad: float) -> None:
    with pytest.raises(ValueError, match=r"metrics\.loss"):
        payload_json({"metrics": {"loss": bad}})


def test_payload_json_refuses_non_string_key() -> None:
    with pytest.raises(ValueError, match="non-string key 3"):
        payload_json({"counts": {3: "x"}})  # type: ignore[dict-item]


def test_payload_json_refuses_non_json_type_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"tags\[1\].*bytes"):
        payload_json({"tags": ["ok", b"raw"]})  # type: ignore[list-item]


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_payload_json_reads_back_and_is_a_fixed_point(payload: dict[str, JsonValue]) -> None:
    text = payload_json(payload)

    assert json.loads(text) == payload
    assert payload_json(json.loads(text)) == text


def test_entry_fields_are_flat_with_payload_as_canonical_text() -> None:
    fields = entry_fields(3, EntryKind.TASK_SENT, KAT_CREATED_AT, {"b": 2, "a": 1}, "e" * 64)

    assert fields == {
        "seq": 3,
        "kind": "task_sent",
        "created_at": KAT_CREATED_AT,
        "payload": '{"a":1,"b":2}',
        "prev_hash": "e" * 64,
    }


def test_utc_now_has_microseconds_and_z() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", utc_now())

"""The consistency stage's request records: what a site parses from the coordinator.

Whatever the coordinator puts in them, the only error a site raises is ProtocolError.
"""

from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsilo.protocol.records import ProtocolError
from fedsilo.protocol.secagg_records import (
    SURVIVOR_SIGNATURES_KEY,
    SURVIVORS_KEY,
    survivor_signatures_from_content,
    survivor_signatures_record,
    survivors_from_content,
    survivors_record,
)

# The value types a ConfigRecord can hold, as single values and as lists of one type.
SCALARS = [
    st.text(max_size=8),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.binary(max_size=80),
]
VALUES = st.one_of(*SCALARS, *(st.lists(s, max_size=6) for s in SCALARS))
FIELDS = st.dictionaries(
    st.sampled_from(["survivors", "sites", "signatures", "other"]), VALUES, max_size=4
)


def _content(key: str, fields: dict[str, Any]) -> RecordDict:
    return RecordDict({key: ConfigRecord(fields)})


def test_records_round_trip() -> None:
    survivors = ["site-1", "site-0"]
    content = RecordDict({SURVIVORS_KEY: survivors_record(survivors)})
    assert survivors_from_content(content) == {"site-0", "site-1"}
    signatures = {"site-1": b"\x01" * 64, "site-0": b"\x00" * 64}
    content = RecordDict({SURVIVOR_SIGNATURES_KEY: survivor_signatures_record(signatures)})
    assert survivor_signatures_from_content(content) == signatures


def test_duplicates_and_missing_records_are_refused() -> None:
    with pytest.raises(ProtocolError, match="names a survivor twice"):
        survivors_from_content(_content(SURVIVORS_KEY, {"survivors": ["a", "a"]}))
    with pytest.raises(ProtocolError, match="names no survivors"):
        survivors_from_content(RecordDict({}))
    twice = {"sites": ["a", "a"], "signatures": [b"x", b"y"]}
    with pytest.raises(ProtocolError, match="malformed"):
        survivor_signatures_from_content(_content(SURVIVOR_SIGNATURES_KEY, twice))
    with pytest.raises(ProtocolError, match="no signatures"):
        survivor_signatures_from_content(RecordDict({}))


@settings(max_examples=200, deadline=None)
@given(fields=FIELDS)
def test_any_survivors_record_parses_or_raises_protocol_error(fields: dict[str, Any]) -> None:
    try:
        survivors = survivors_from_content(_content(SURVIVORS_KEY, fields))
    except ProtocolError:
        return
    assert all(isinstance(name, str) for name in survivors)


@settings(max_examples=200, deadline=None)
@given(fields=FIELDS)
def test_any_signatures_record_parses_or_raises_protocol_error(fields: dict[str, Any]) -> None:
    try:
        signatures = survivor_signatures_from_content(_content(SURVIVOR_SIGNATURES_KEY, fields))
    except ProtocolError:
        return
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in signatures.items())

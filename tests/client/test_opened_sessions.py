from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsilo.client.opened_sessions import last_attempts, opened_before, read_opened
from fedsilo.privacy.secagg.masking import SessionId
from fedsilo.privacy.secagg.site import SecAggRefusedError


def test_a_record_keeps_the_last_attempt_of_each_round() -> None:
    keys = ["fed/run/1/1", "fed/run/1/3", "fed/run/2/1", "fed/run/1/2", "other/run/1/4"]

    assert last_attempts(keys) == ["fed/run/1/3", "fed/run/2/1", "other/run/1/4"]


def test_a_federation_id_with_a_slash_still_parses_by_its_last_parts() -> None:
    assert last_attempts(["a/b/run/1/2", "a/b/run/1/5"]) == ["a/b/run/1/5"]


@pytest.mark.parametrize(
    ("attempt", "ruled_out_by"),
    [(2, "fed/run/1/3"), (3, "fed/run/1/3"), (4, None)],
)
def test_only_a_later_attempt_of_a_round_may_open(attempt: int, ruled_out_by: str | None) -> None:
    opened = ["fed/run/1/3", "fed/run/2/1"]

    assert opened_before(opened, SessionId("fed", "run", 1, attempt)) == ruled_out_by
    assert opened_before(opened, SessionId("fed", "other-run", 1, 1)) is None


def test_an_older_record_with_every_attempt_is_read_as_the_last_of_each_round(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secure-sessions.json"
    path.write_text(json.dumps(["fed/run/1/1", "fed/run/1/2", "fed/run/2/1"]))

    assert read_opened(path, site="site-1") == ["fed/run/1/2", "fed/run/2/1"]


def test_a_record_with_a_malformed_key_refuses_naming_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "secure-sessions.json"
    path.write_text(json.dumps(["fed/run/1/1", "fed/run/1/latest"]))

    with pytest.raises(SecAggRefusedError, match="fed/run/1/latest") as raised:
        read_opened(path, site="site-1")
    assert str(path) in str(raised.value)

"""metrics.jsonl and round.json stay JSON: no NaN or Infinity is ever written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedsilo.server.federation import _finite_record
from fedsilo.server.run_folder import RunFolder


class Notices:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        pass

    def notice(self, text: str) -> None:
        self.texts.append(text)


def test_writing_infinity_into_metrics_is_refused_and_keeps_the_file(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir(parents=True)
    folder.write_metrics([{"round": 0, "gold_loss": 1.5}])

    with pytest.raises(ValueError, match="not JSON compliant"):
        folder.append_metrics({"round": 1, "gold_loss": math.inf})

    assert folder.read_metrics() == [{"round": 0, "gold_loss": 1.5}]
    assert "Infinity" not in folder.metrics_path.read_text()


def test_non_finite_round_values_are_recorded_as_null_with_a_notice() -> None:
    notices = Notices()
    record = {"round": 2, "gold_loss": math.inf, "epsilon": {"site-a": math.nan, "site-b": 3.0}}

    cleaned = _finite_record(record, notices, 2)

    assert cleaned == {"round": 2, "gold_loss": None, "epsilon": {"site-a": None, "site-b": 3.0}}
    assert notices.texts == [
        "round 2: not finite, recorded as null: ['gold_loss', 'epsilon.site-a']"
    ]

"""[evaluation] every_rounds: the gold set is scored at round 0, every N-th round and the last."""

from __future__ import annotations

import re
from collections.abc import Callable
from html import unescape
from pathlib import Path

from fedsilo.cli.main import main
from fedsilo.config import FedsiloConfig
from fedsilo.server.audit import verify_run
from fedsilo.server.run_folder import RunFolder

from ..simulation.conftest import run_with_grid


def test_gold_is_scored_every_n_rounds_and_after_the_last(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_with_grid(make_config(run={"rounds": 3}, evaluation={"every_rounds": 2}), run)

    records = RunFolder(run).read_metrics()

    scored = [r["round"] for r in records if "gold_accuracy" in r]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert scored == [0, 2, 3]
    assert "gold_parts" not in records[1] and records[1]["train_loss"] is not None
    # A round without gold figures still verifies (its metrics are bound in the ledger) and
    # shows in the compliance report with dashes and a sentence that says why.
    assert verify_run(run).ok
    out = tmp_path / "report.html"
    assert main(["audit", "report", str(run), "--out", str(out)]) == 0
    text = re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", out.read_text())))
    assert "the gold set was not scored after that round" in text
    row_one = r" 1 [a-z_, ]+ \d+ [\d.]+ \u2014 \u2014 \u2014 \u2014 [0-9a-f]{64}"
    assert re.search(row_one, text), "round 1 shows dashes for its gold figures"


def test_every_round_is_scored_by_default(
    make_config: Callable[..., FedsiloConfig], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_with_grid(make_config(run={"rounds": 2}), run)

    assert all("gold_accuracy" in r for r in RunFolder(run).read_metrics())

"""A progress reporter that writes to the log (for runs without a terminal)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fedsilo.progress")


class LogReporter:
    """Logs one line per round and every notice."""

    def round_done(self, record: dict[str, Any], *, total_rounds: int) -> None:
        log.info(
            "round %d/%d: %d sites ok, %d failed, train loss %s, gold accuracy %s",
            record["round"],
            total_rounds,
            record["sites_ok"],
            record["sites_failed"],
            record["train_loss"],
            record.get("gold_accuracy", "not scored"),
        )

    def notice(self, text: str) -> None:
        log.warning("%s", text)

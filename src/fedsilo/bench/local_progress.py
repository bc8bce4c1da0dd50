"""Where a stopped local-only baseline goes on: the sites already trained alone and scored.

Each site's local-only training is independent of the others' (its own adapter, its own
seeds), so a site finished and scored is never trained again on resume; a site stopped midway
starts over. ``local/progress.json`` in the benchmark's run folder holds each finished site's
gold figures and step count with the identity of the benchmark it belongs to; it is replaced
atomically after every site.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.bench.resume_identity import CheckpointMismatchError, check_identity
from fedsilo.storage.atomic import write_text_atomic

# The figures the local-only summary (mean and worst site) is computed from.
_SUMMARIZED = ("gold_accuracy", "gold_category_accuracy", "gold_loss")
FOLDER = "local"
PROGRESS = "progress.json"


@dataclass(frozen=True)
class LocalSiteResult:
    """One site trained alone for the whole budget: its gold row (as the results file holds
    it) and optimizer steps."""

    gold: dict[str, Any]
    steps: int


def has_local_progress(out_dir: Path) -> bool:
    return (out_dir / FOLDER / PROGRESS).exists()


def save_local_progress(
    out_dir: Path, identity: dict[str, Any], finished: Mapping[str, LocalSiteResult]
) -> None:
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    progress = {
        "identity": identity,
        "sites": {
            name: {"gold": result.gold, "steps": result.steps} for name, result in finished.items()
        },
    }
    write_text_atomic(folder / PROGRESS, json.dumps(progress, indent=2) + "\n")


def load_local_progress(out_dir: Path, identity: dict[str, Any]) -> dict[str, LocalSiteResult]:
    """The sites finished under ``out_dir`` (none if no progress file), if the file belongs to
    the benchmark ``identity`` names; else :class:`CheckpointMismatchError` naming the field
    or the site whose record is malformed."""
    path = out_dir / FOLDER / PROGRESS
    if not path.exists():
        return {}
    try:
        progress = json.loads(path.read_text())
        stored = dict(progress["identity"])
        sites = dict(progress["sites"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointMismatchError(f"{path}: not a local-only progress file ({error})") from None
    check_identity(path, stored, identity)
    finished = {}
    for name, record in sites.items():
        try:
            gold = dict(record["gold"])
            steps = int(record["steps"])
            headline = [float(gold[key]) for key in _SUMMARIZED]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointMismatchError(f"{path}: site {name!r}: {error}") from None
        if steps < 0 or not all(math.isfinite(value) for value in headline):
            raise CheckpointMismatchError(
                f"{path}: site {name!r}: steps or gold figures out of range"
            )
        finished[str(name)] = LocalSiteResult(gold, steps)
    return finished

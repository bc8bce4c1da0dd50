"""Where a stopped centralized baseline goes on: its adapter and learning curve after a round.

A centralized round starts a fresh optimizer from the adapter and draws its batches from a
seed of its own (as a site's round does), so the adapter after round r and the rows scored so
far are all a resumed run needs to continue exactly as an unbroken one. The checkpoint names
the benchmark it belongs to (the results file's identity fields) and is refused by another.

Layout, in the benchmark's run folder: ``centralized/adapter-round-R.safetensors`` and
``centralized/progress.json``, which names that adapter and is replaced last, atomically, so
a run stopped at any point leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.bench.resume_identity import CheckpointMismatchError, check_identity
from fedsilo.model.adapters import AdapterState, load_adapter, save_adapter
from fedsilo.storage.atomic import write_text_atomic

__all__ = [
    "CheckpointMismatchError",
    "PooledCheckpoint",
    "has_pooled_checkpoint",
    "load_pooled_checkpoint",
    "save_pooled_checkpoint",
]

FOLDER = "centralized"
PROGRESS = "progress.json"


@dataclass(frozen=True)
class PooledCheckpoint:
    """The centralized baseline after ``round``: its adapter, the rows scored so far and the
    compute seconds spent on them (in every process that worked on it)."""

    round: int
    rows: list[dict[str, Any]]
    seconds: float
    adapter: AdapterState


def _adapter_name(round_number: int) -> str:
    return f"adapter-round-{round_number}.safetensors"


def save_pooled_checkpoint(
    out_dir: Path, identity: dict[str, Any], checkpoint: PooledCheckpoint
) -> None:
    """Write ``checkpoint`` under ``out_dir``; the previous round's adapter is removed after
    the new progress file is in place."""
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(checkpoint.adapter, folder / _adapter_name(checkpoint.round))
    progress = {
        "identity": identity,
        "round": checkpoint.round,
        "rows": checkpoint.rows,
        "seconds": checkpoint.seconds,
        "adapter": _adapter_name(checkpoint.round),
    }
    write_text_atomic(folder / PROGRESS, json.dumps(progress, indent=2) + "\n")
    for stale in folder.glob("adapter-round-*.safetensors"):
        if stale.name != progress["adapter"]:
            stale.unlink()


def has_pooled_checkpoint(out_dir: Path) -> bool:
    return (out_dir / FOLDER / PROGRESS).exists()


def load_pooled_checkpoint(out_dir: Path, identity: dict[str, Any]) -> PooledCheckpoint | None:
    """The checkpoint under ``out_dir`` (None if there is none), if it belongs to the benchmark
    ``identity`` names; else :class:`CheckpointMismatchError` naming the field."""
    path = out_dir / FOLDER / PROGRESS
    if not path.exists():
        return None
    try:
        progress = json.loads(path.read_text())
        stored = dict(progress["identity"])
        round_number = int(progress["round"])
        rows = list(progress["rows"])
        seconds = float(progress["seconds"])
        adapter_name = str(progress["adapter"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointMismatchError(f"{path}: not a centralized checkpoint ({error})") from None
    check_identity(path, stored, identity)
    if adapter_name != _adapter_name(round_number):
        raise CheckpointMismatchError(
            f"{path}: names adapter {adapter_name!r} for round {round_number}"
        )
    adapter = load_adapter(path.parent / adapter_name)
    return PooledCheckpoint(round_number, rows, seconds, adapter)

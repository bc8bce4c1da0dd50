"""Whether a checkpoint left in a benchmark's run folder belongs to this benchmark.

A checkpoint stores the identity fields of the results file it was written for (task, model,
budget, seed...); a run with other settings must not continue it, and is told which field
differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CheckpointMismatchError(ValueError):
    """A checkpoint left by another benchmark, or not a checkpoint; says which field differs."""


def check_identity(path: Path, stored: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first field of ``identity`` that the
    checkpoint at ``path`` (its fields ``stored``) holds with another value."""
    # Compared as JSON, as written: tuples and lists alike.
    for key, value in json.loads(json.dumps(identity)).items():
        if stored.get(key) != value:
            raise CheckpointMismatchError(
                f"{path}: field {key!r} differs from this run ({stored.get(key)!r} there, "
                f"{value!r} here); resume with the same settings or choose another --out"
            )

"""Reading the small JSON files of a run folder, which an auditor may be handed by anyone."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 1024**2
"""Largest JSON object file read whole (status, run information, membership, round records);
the largest fedsilo writes, a membership of thousands of sites, is a few megabytes."""


def read_json_object(path: Path, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path``; ValueError naming ``path`` otherwise.

    A link to a device, a FIFO, a file too large to hold or JSON nested deeper than the parser's
    stack is refused before it can exhaust memory or hang the reader. A missing file raises
    FileNotFoundError, as reading it would.
    """
    path = Path(path)
    # Opened without blocking and checked on the open descriptor: a FIFO swapped in after a
    # separate check could otherwise still block the open or the read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: over the {limit}-byte limit for a JSON file")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and e.g. an integer of too many digits
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value

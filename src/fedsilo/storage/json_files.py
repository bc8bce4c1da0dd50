"""Bounded reads of files others may hand over: run-folder JSON, a site's own records."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

MAX_JSON_BYTES = 64 * 1024**2
"""Largest JSON file read whole (status, run information, membership, round records, a site's
records); the largest fedsilo writes, a membership of thousands of sites, is a few megabytes."""


@contextmanager
def open_regular_file(path: Path, *, limit: int) -> Iterator[BinaryIO]:
    """``path`` opened for reading when it is a regular file of at most ``limit`` bytes;
    ValueError naming ``path`` otherwise.

    Opened without blocking and checked on the open descriptor: a FIFO or a device, even one
    swapped in after a separate check, cannot block or exhaust the reader. A missing file
    raises FileNotFoundError, as opening it would. The caller still stops at ``limit`` bytes
    read: the file may grow after the check.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes, over the {limit}-byte limit")
        yield handle


def read_regular_file(path: Path, *, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit``; ValueError naming ``path``
    (see :func:`open_regular_file`)."""
    with open_regular_file(path, limit=limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: over the {limit}-byte limit")
    return data


def read_json_value(path: Path, *, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the regular file ``path``; ValueError naming ``path`` otherwise
    (JSON nested deeper than the parser's stack included)."""
    path = Path(path)
    data = read_regular_file(path, limit=limit)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and e.g. an integer of too many digits
        raise ValueError(f"{path}: not valid JSON: {error}") from None


def read_json_object(path: Path, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path``; ValueError naming ``path`` otherwise."""
    value = read_json_value(path, limit=limit)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value

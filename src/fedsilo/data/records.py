"""A site's private records, read from a JSONL, CSV or Parquet file.

A record is either a chat exchange (``prompt`` and ``response`` fields) or plain text (a ``text``
field); one file may mix both. Every field used must be a non-empty string. A missing value
(JSON ``null``, a Parquet null, an empty CSV cell, since CSV cannot tell empty from absent) counts
as an absent field, so files with a column per field can hold both kinds of record. Fields other
than these three are ignored, and their names are logged once per file.

Nothing is dropped silently: every problem raises :class:`DataError`, whose message names the
file, the place in it (JSONL: 1-based line; CSV: 1-based data row and its line; Parquet: 0-based
row index) and the field. Blank JSONL lines and blank CSV lines are skipped and their count is
logged.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_FIELD = "text"
PROMPT_FIELD = "prompt"
RESPONSE_FIELD = "response"
RECORD_FIELDS = (TEXT_FIELD, PROMPT_FIELD, RESPONSE_FIELD)

MAX_FIELD_BYTES = 16 * 1024**2
"""Largest JSONL line or CSV field read: far above any clinical note (the csv module's own
default, 128 KiB, is not), far below what would exhaust a site's memory before a check."""
_PARQUET_BATCH_ROWS = 4096


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, place and field."""


@dataclass(frozen=True)
class ChatRecord:
    """One exchange: the model is trained to give ``response`` when asked ``prompt``."""

    prompt: str
    response: str


@dataclass(frozen=True)
class TextRecord:
    """Plain text for language-model training (the loss covers every token)."""

    text: str


Record = ChatRecord | TextRecord


@dataclass(frozen=True)
class _RawRecord:
    """One record's fields as read from a file, before validation."""

    where: str  # e.g. "line 7", "row 3 (line 4)", "row index 2"
    fields: Mapping[str, object]


@dataclass
class _ReadStats:
    """What was skipped while reading; logged once per file."""

    blank_lines: int = 0
    ignored_fields: set[str] = field(default_factory=set)


_Reader = Callable[[Path, _ReadStats], Iterator[_RawRecord]]


def _type_name(value: object) -> str:
    return type(value).__name__


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object's members; a key given twice is an error, not the last one winning."""
    fields: dict[str, object] = {}
    for key, value in pairs:
        if key in fields:
            raise _DuplicateKeyError(key)
        fields[key] = value
    return fields


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``path``'s lines (1-based numbers), none read beyond :data:`MAX_FIELD_BYTES`."""
    with path.open("rb") as handle:
        number = 0
        while raw_line := handle.readline(MAX_FIELD_BYTES + 1):
            number += 1
            if len(raw_line) > MAX_FIELD_BYTES:
                raise DataError(f"{path}: line {number}: over the {MAX_FIELD_BYTES}-byte limit")
            yield number, raw_line


def _read_jsonl(path: Path, stats: _ReadStats) -> Iterator[_RawRecord]:
    for number, raw_line in _jsonl_lines(path):
        # Decoding line by line lets an encoding error name its line.
        try:
            line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid UTF-8 ({error.reason})") from None
        if not line.strip():
            stats.blank_lines += 1
            continue
        try:
            value = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKeyError as error:
            raise DataError(f"{path}: line {number}: field {error.key!r} given twice") from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {number}: invalid JSON: {error.msg} (column {error.colno})"
            ) from None
        except RecursionError:
            raise DataError(f"{path}: line {number}: JSON nested too deeply") from None
        except ValueError as error:  # e.g. an integer of too many digits
            raise DataError(f"{path}: line {number}: invalid JSON: {error}") from None
        if not isinstance(value, dict):
            raise DataError(
                f"{path}: line {number}: expected a JSON object, got {_type_name(value)}"
            )
        yield _RawRecord(where=f"line {number}", fields=value)


def _read_csv(path: Path, stats: _ReadStats) -> Iterator[_RawRecord]:
    previous_limit = csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            header: list[str] | None = None
            data_row = 0
            while True:
                # A quoted cell may span lines: remember where this row starts.
                line = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    raise DataError(f"{path}: line {line}: invalid CSV: {error}") from None
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path}: near line {line}: not valid UTF-8 ({error.reason})"
                    ) from None
                if not cells:
                    stats.blank_lines += 1
                elif header is None:
                    header = _checked_header(path, line, cells)
                else:
                    data_row += 1
                    yield _csv_record(path, header, cells, where=f"row {data_row} (line {line})")
            if header is None:
                raise DataError(f"{path}: empty CSV file (no header row)")
    finally:
        csv.field_size_limit(previous_limit)


def _checked_header(path: Path, line: int, header: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: line {line}: column {name!r} appears twice in the header")
        seen.add(name)
    return header


def _csv_record(path: Path, header: list[str], cells: list[str], *, where: str) -> _RawRecord:
    if len(cells) != len(header):
        raise DataError(
            f"{path}: {where}: expected {len(header)} fields as in the header "
            f"({', '.join(header)}), got {len(cells)}"
        )
    # CSV has no null: an empty cell is an absent field (see the module docstring).
    fields = {name: cell for name, cell in zip(header, cells, strict=True) if cell}
    return _RawRecord(where=where, fields=fields)


def _read_parquet(path: Path, stats: _ReadStats) -> Iterator[_RawRecord]:
    # Imported here: pyarrow is large, and only a Parquet file needs it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None
    names = parquet.schema_arrow.names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once")
    used = [name for name in names if name in RECORD_FIELDS]
    if not used and parquet.metadata.num_rows > 0:
        # Reading zero columns would say nothing useful; name the columns that do exist.
        raise DataError(
            f"{path}: row index 0: missing field {TEXT_FIELD!r} (a record needs {TEXT_FIELD!r}, "
            f"or {PROMPT_FIELD!r} and {RESPONSE_FIELD!r}); the file's columns are: "
            f"{', '.join(names) or '(none)'}"
        )
    # Other columns are not read at all; report them as ignored like other formats do.
    stats.ignored_fields.update(name for name in names if name not in RECORD_FIELDS)
    index = 0
    try:
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=used)
        for batch in batches:
            for row in batch.to_pylist():
                yield _RawRecord(where=f"row index {index}", fields=row)
                index += 1
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: row index {index}: cannot read Parquet data: {error}") from None


_READERS: dict[str, _Reader] = {
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}

SUPPORTED_SUFFIXES = tuple(_READERS)


def _string_field(path: Path, raw: _RawRecord, name: str) -> str | None:
    """The field's value, ``None`` if absent; raises if present but not a non-empty string."""
    value = raw.fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{path}: {raw.where}: field {name!r} must be a string, got {_type_name(value)}"
        )
    if not value.strip():
        raise DataError(f"{path}: {raw.where}: field {name!r} is empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:  # a lone surrogate (JSON's "\ud800"): not text
        raise DataError(
            f"{path}: {raw.where}: field {name!r} is not valid Unicode text ({error.reason})"
        ) from None
    # JSONL lines and CSV cells are cut off at the limit while reading; a Parquet cell arrives
    # whole in its batch of rows, and is held to the same limit here.
    if size > MAX_FIELD_BYTES:
        raise DataError(
            f"{path}: {raw.where}: field {name!r} is over the {MAX_FIELD_BYTES}-byte limit"
        )
    return value


def _to_record(path: Path, raw: _RawRecord) -> Record:
    text = _string_field(path, raw, TEXT_FIELD)
    prompt = _string_field(path, raw, PROMPT_FIELD)
    response = _string_field(path, raw, RESPONSE_FIELD)
    if text is not None:
        if prompt is not None or response is not None:
            extra = PROMPT_FIELD if prompt is not None else RESPONSE_FIELD
            raise DataError(
                f"{path}: {raw.where}: field {extra!r} given with field {TEXT_FIELD!r}; "
                "a record is either text or a prompt/response pair"
            )
        return TextRecord(text=text)
    if prompt is not None and response is not None:
        return ChatRecord(prompt=prompt, response=response)
    if prompt is not None:
        raise DataError(f"{path}: {raw.where}: missing field {RESPONSE_FIELD!r} (has 'prompt')")
    if response is not None:
        raise DataError(f"{path}: {raw.where}: missing field {PROMPT_FIELD!r} (has 'response')")
    raise DataError(
        f"{path}: {raw.where}: missing field {TEXT_FIELD!r} "
        f"(a record needs {TEXT_FIELD!r}, or {PROMPT_FIELD!r} and {RESPONSE_FIELD!r})"
    )


def load_records(path: Path) -> list[Record]:
    """Read every record of ``path``; the format is chosen by the file's suffix.

    Raises :class:`DataError` for an unsupported suffix, a missing or unparsable file, a record
    that is neither text nor a prompt/response pair, a field that is not a non-empty string, and
    a file without records.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    stats = _ReadStats()
    records: list[Record] = []
    try:
        for raw in reader(path, stats):
            stats.ignored_fields.update(name for name in raw.fields if name not in RECORD_FIELDS)
            records.append(_to_record(path, raw))
    except OSError as error:
        raise DataError(f"{path}: cannot read file: {error}") from None
    if stats.blank_lines:
        log.info("%s: skipped %d blank line(s)", path, stats.blank_lines)
    if stats.ignored_fields:
        log.info("%s: ignored field(s): %s", path, ", ".join(sorted(stats.ignored_fields)))
    if not records:
        raise DataError(f"{path}: no records")
    log.info("%s: loaded %d record(s)", path, len(records))
    return records

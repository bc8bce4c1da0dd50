"""Loading a site's records from JSONL, CSV and Parquet, and the errors for bad input."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsilo.data import records
from fedsilo.data.records import ChatRecord, DataError, TextRecord, load_records
from fedsilo.storage import write_bytes_atomic, write_text_atomic


def _jsonl(path: Path, *values: object) -> Path:
    write_text_atomic(path, "".join(json.dumps(value) + "\n" for value in values))
    return path


def _parquet(path: Path, table: pa.Table) -> Path:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return path


# --- each format loads -------------------------------------------------------------------------


def test_jsonl_loads_chat_and_text_records_in_order(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "site.jsonl",
        {"prompt": "Code for asthma?", "response": "J45.909"},
        {"text": "Asthma is a chronic disease."},
    )

    records = load_records(path)

    assert records == [
        ChatRecord(prompt="Code for asthma?", response="J45.909"),
        TextRecord(text="Asthma is a chronic disease."),
    ]


def test_csv_loads_mixed_records_with_empty_cells_as_absent(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, 'prompt,response,text\n"Q, one",A1,\n,,"plain\ntext"\n')

    records = load_records(path)

    assert records == [ChatRecord(prompt="Q, one", response="A1"), TextRecord(text="plain\ntext")]


def test_parquet_loads_mixed_records_with_nulls_as_absent(tmp_path: Path) -> None:
    table = pa.table(
        {
            "prompt": ["Q1", None],
            "response": ["A1", None],
            "text": [None, "some text"],
        }
    )
    path = _parquet(tmp_path / "site.parquet", table)

    records = load_records(path)

    assert records == [ChatRecord(prompt="Q1", response="A1"), TextRecord(text="some text")]


def test_suffix_is_matched_case_insensitively(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "SITE.JSONL", {"text": "t"})

    assert load_records(path) == [TextRecord(text="t")]


def test_jsonl_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    write_bytes_atomic(path, b"\xef\xbb\xbf" + json.dumps({"text": "t"}).encode() + b"\n")

    assert load_records(path) == [TextRecord(text="t")]


# --- logging: nothing is skipped silently -------------------------------------------------------


def test_blank_jsonl_lines_are_skipped_and_their_count_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "site.jsonl"
    write_text_atomic(path, '{"text": "a"}\n\n   \n{"text": "b"}\n\n')
    caplog.set_level(logging.INFO, logger="fedsilo.data.records")

    records = load_records(path)

    assert len(records) == 2
    assert f"{path}: skipped 3 blank line(s)" in caplog.messages


def test_ignored_fields_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(
        tmp_path / "site.jsonl",
        {"text": "a", "id": 1},
        {"text": "b", "id": 2, "source": "x"},
    )
    caplog.set_level(logging.INFO, logger="fedsilo.data.records")

    load_records(path)

    ignored = [message for message in caplog.messages if "ignored field" in message]
    assert ignored == [f"{path}: ignored field(s): id, source"]


def test_parquet_columns_that_are_not_record_fields_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _parquet(tmp_path / "site.parquet", pa.table({"text": ["a"], "note_id": [7]}))
    caplog.set_level(logging.INFO, logger="fedsilo.data.records")

    load_records(path)

    assert f"{path}: ignored field(s): note_id" in caplog.messages


# --- file-level errors --------------------------------------------------------------------------


def test_unsupported_suffix_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "site.txt"
    write_text_atomic(path, "text\n")

    with pytest.raises(DataError, match=r"site\.txt.*\.jsonl, \.csv, \.parquet"):
        load_records(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"

    with pytest.raises(DataError, match=r"absent\.jsonl: file does not exist"):
        load_records(path)


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "folder.csv"
    path.mkdir()

    with pytest.raises(DataError, match=r"folder\.csv: not a file"):
        load_records(path)


def test_jsonl_with_only_blank_lines_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    write_text_atomic(path, "\n\n")

    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_records(path)


def test_csv_with_header_only_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    write_text_atomic(path, "prompt,response\n")

    with pytest.raises(DataError, match=r"empty\.csv: no records"):
        load_records(path)


def test_empty_csv_file_has_no_header(tmp_path: Path) -> None:
    path = tmp_path / "void.csv"
    write_text_atomic(path, "")

    with pytest.raises(DataError, match=r"void\.csv: empty CSV file \(no header row\)"):
        load_records(path)


def test_parquet_without_rows_has_no_records(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "empty.parquet", pa.table({"text": pa.array([], pa.string())}))

    with pytest.raises(DataError, match=r"empty\.parquet: no records"):
        load_records(path)


def test_corrupt_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    write_bytes_atomic(path, b"PAR1 this is not parquet")

    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_records(path)


# --- JSONL record errors name file, line and field ---------------------------------------------


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    write_text_atomic(path, '{"text": "a"}\n{"text": "b"}\n{"text": \n')

    with pytest.raises(DataError, match=r"site\.jsonl: line 3: invalid JSON"):
        load_records(path)


def test_blank_lines_still_count_towards_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    write_text_atomic(path, '{"text": "a"}\n\n\nnot json\n')

    with pytest.raises(DataError, match=r"site\.jsonl: line 4: invalid JSON"):
        load_records(path)


def test_json_value_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "site.jsonl", {"text": "a"}, ["text", "b"])

    with pytest.raises(DataError, match=r"site\.jsonl: line 2: expected a JSON object, got list"):
        load_records(path)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    write_bytes_atomic(path, b'{"text": "a"}\n{"text": "\xff"}\n')

    with pytest.raises(DataError, match=r"site\.jsonl: line 2: not valid UTF-8"):
        load_records(path)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "Q"}, r"line 2: missing field 'response'"),
        ({"response": "A"}, r"line 2: missing field 'prompt'"),
        ({"prompt": "Q", "response": ""}, r"line 2: field 'response' is empty"),
        ({"prompt": "Q", "response": " \n\t"}, r"line 2: field 'response' is empty"),
        ({"prompt": "Q", "response": None}, r"line 2: missing field 'response'"),
        ({"question": "Q", "answer": "A"}, r"line 2: missing field 'text'"),
        ({}, r"line 2: missing field 'text'"),
        ({"text": 5}, r"line 2: field 'text' must be a string, got int"),
        ({"prompt": ["Q"], "response": "A"}, r"line 2: field 'prompt' must be a string, got list"),
        ({"text": "T", "prompt": "Q"}, r"line 2: field 'prompt' given with field 'text'"),
    ],
)
def test_bad_jsonl_record_names_file_line_and_field(
    tmp_path: Path, record: dict[str, object], expected: str
) -> None:
    path = _jsonl(tmp_path / "site.jsonl", {"text": "fine"}, record)

    with pytest.raises(DataError, match=rf"site\.jsonl: {expected}"):
        load_records(path)


# --- CSV record errors name file, row, line and field ------------------------------------------


def test_csv_missing_response_names_row_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, "prompt,response\nQ1,A1\nQ2,\n")

    with pytest.raises(DataError, match=r"site\.csv: row 2 \(line 3\): missing field 'response'"):
        load_records(path)


def test_csv_line_number_follows_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, 'prompt,response\n"line one\nline two",A1\nQ2,\n')

    with pytest.raises(DataError, match=r"site\.csv: row 2 \(line 4\): missing field 'response'"):
        load_records(path)


def test_csv_row_with_wrong_field_count_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, "prompt,response\nQ1,A1,extra\n")

    with pytest.raises(DataError, match=r"site\.csv: row 1 \(line 2\): expected 2 fields"):
        load_records(path)


def test_csv_with_bad_quoting_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, 'text\nfine\n"broken"quote\n')

    with pytest.raises(DataError, match=r"site\.csv: line 3: invalid CSV"):
        load_records(path)


def test_csv_duplicate_header_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    write_text_atomic(path, "text,text\na,b\n")

    with pytest.raises(DataError, match=r"site\.csv: line 1: column 'text' appears twice"):
        load_records(path)


def test_csv_cells_longer_than_the_csv_default_limit_load(tmp_path: Path) -> None:
    long_text = "x" * 200_000
    path = tmp_path / "site.csv"
    write_text_atomic(path, f"text\n{long_text}\n")

    assert load_records(path) == [TextRecord(text=long_text)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": "a", "n": ' + "1" * 5000 + "}", r"line 1: invalid JSON: Exceeds the limit"),
        ('{"text": "a", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"text": "first", "text": "second"}', r"line 1: field 'text' given twice"),
        ('{"text": "a\\ud800b"}', r"line 1: field 'text' is not valid Unicode text"),
    ],
)
def test_hostile_jsonl_lines_name_the_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "site.jsonl"
    write_text_atomic(path, line + "\n")

    with pytest.raises(DataError, match=reason):
        load_records(path)


def test_a_line_or_cell_over_the_field_limit_is_refused_before_it_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_FIELD_BYTES", 1000)
    jsonl = _jsonl(tmp_path / "site.jsonl", {"text": "short"}, {"text": "x" * 2000})
    csv_file = tmp_path / "site.csv"
    write_text_atomic(csv_file, "text\nshort\n" + "x" * 2000 + "\n")

    with pytest.raises(DataError, match=r"site\.jsonl: line 2: over the 1000-byte limit"):
        load_records(jsonl)
    with pytest.raises(DataError, match=r"site\.csv: line 3: invalid CSV: field larger"):
        load_records(csv_file)


def test_a_parquet_cell_over_the_field_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_FIELD_BYTES", 1000)
    table = pa.table({"prompt": ["Q1", "Q2"], "response": ["A1", "é" * 501]})  # 1,002 bytes
    path = _parquet(tmp_path / "site.parquet", table)

    with pytest.raises(
        DataError, match=r"site\.parquet: row index 1: field 'response' is over the 1000-byte"
    ):
        load_records(path)
    monkeypatch.setattr(records, "MAX_FIELD_BYTES", 1002)
    assert len(load_records(path)) == 2


# --- Parquet record errors name file, row index and field --------------------------------------


def test_parquet_non_string_column_names_row_and_type(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "site.parquet", pa.table({"text": [3, 4]}))

    with pytest.raises(
        DataError, match=r"site\.parquet: row index 0: field 'text' must be a string, got int"
    ):
        load_records(path)


def test_parquet_null_response_names_row_and_field(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["Q1", "Q2"], "response": ["A1", None]})
    path = _parquet(tmp_path / "site.parquet", table)

    with pytest.raises(DataError, match=r"site\.parquet: row index 1: missing field 'response'"):
        load_records(path)


def test_parquet_column_given_twice_is_rejected(tmp_path: Path) -> None:
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    path = _parquet(tmp_path / "site.parquet", table)

    with pytest.raises(DataError, match=r"site\.parquet: column\(s\) 'text' appear more than once"):
        load_records(path)


def test_parquet_without_record_columns_names_the_columns(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "site.parquet", pa.table({"question": ["Q"]}))

    with pytest.raises(
        DataError, match=r"site\.parquet: row index 0: missing field 'text'.*columns are: question"
    ):
        load_records(path)


def test_pyarrow_is_loaded_only_to_read_parquet() -> None:
    # A training run on JSONL or built-in tasks does not need pyarrow installed.
    code = (
        "import sys; import fedsilo.data.records, fedsilo.bench.quality, fedsilo.server.app; "
        "print('pyarrow' in sys.modules)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()[-1]

    assert imported == "False"

"""Bounded reads of run-folder JSON files: whatever a file holds, the error names it."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsilo.storage import read_json_object


def test_a_json_object_is_read(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text('{"status": "completed"}')

    assert read_json_object(path) == {"status": "completed"}


@pytest.mark.parametrize(
    ("write", "named"),
    [
        (lambda path: path.write_text("[1, 2]"), "expected a JSON object, found a list"),
        (lambda path: path.write_text("{nope"), "not valid JSON"),
        (lambda path: path.write_bytes(b'{"a": "\xff"}'), "not UTF-8 text"),
        (lambda path: path.write_text('{"a": "' + "x" * 200 + '"}'), "over the 100-byte limit"),
        (lambda path: os.mkfifo(path), "not a regular file"),  # would block a plain read
        (lambda path: path.symlink_to("/dev/zero"), "not a regular file"),
    ],
)
def test_a_file_that_is_not_a_small_json_object_is_refused_naming_it(
    tmp_path: Path, write: Callable[[Path], None], named: str
) -> None:
    path = tmp_path / "federation.json"
    write(path)

    with pytest.raises(ValueError, match=named) as raised:
        read_json_object(path, limit=100)
    assert str(path) in str(raised.value)


def test_json_nested_deeper_than_the_parser_goes_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    path.write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(ValueError, match=f"{path}: JSON nested too deeply"):
        read_json_object(path)


def test_an_integer_python_will_not_parse_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "round.json"
    path.write_text('{"a": ' + "1" * 5000 + "}")  # over Python's 4,300-digit limit

    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        read_json_object(path)


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "absent.json")

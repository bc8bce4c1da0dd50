"""Crash-safe file and folder writes (a half-written file never replaces a good one), and
bounded reads of the files others may hand over."""

from fedsilo.storage.atomic import (
    atomic_folder,
    folder_lock,
    write_bytes_atomic,
    write_text_atomic,
)
from fedsilo.storage.json_files import (
    open_regular_file,
    read_json_object,
    read_json_value,
    read_regular_file,
)

__all__ = [
    "atomic_folder",
    "folder_lock",
    "open_regular_file",
    "read_json_object",
    "read_json_value",
    "read_regular_file",
    "write_bytes_atomic",
    "write_text_atomic",
]

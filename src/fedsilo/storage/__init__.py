"""Crash-safe file and folder writes (a half-written file never replaces a good one), and
bounded reads of the JSON files others may hand over."""

from fedsilo.storage.atomic import atomic_folder, write_bytes_atomic, write_text_atomic
from fedsilo.storage.json_files import read_json_object

__all__ = ["atomic_folder", "read_json_object", "write_bytes_atomic", "write_text_atomic"]

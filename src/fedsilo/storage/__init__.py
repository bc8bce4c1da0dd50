"""Crash-safe file and folder writes: a half-written file never replaces a good one."""

from fedsilo.storage.atomic import atomic_folder, write_bytes_atomic, write_text_atomic

__all__ = ["atomic_folder", "write_bytes_atomic", "write_text_atomic"]

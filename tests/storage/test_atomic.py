from pathlib import Path

import pytest

from fedsilo.storage import atomic_folder, write_bytes_atomic


def test_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"old")

    write_bytes_atomic(target, b"new content")

    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_failed_folder_write_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (tmp / "x").write_text("good")

    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("crash mid-write")

    assert (target / "x").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_existing_folder_is_not_overwritten_by_default(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()

    with pytest.raises(FileExistsError), atomic_folder(target):
        pass

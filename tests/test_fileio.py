import os

import pytest

from refimpl.fileio import atomic_write


def test_atomic_write_replaces_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        f.write(b"new contents")
    assert p.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_text_mode(tmp_path):
    p = tmp_path / "c.json"
    with atomic_write(p, "w") as f:
        f.write("{\"a\": 1}")
    assert p.read_text() == "{\"a\": 1}"


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(p) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode"), atomic_write("x", "a"):
        pass

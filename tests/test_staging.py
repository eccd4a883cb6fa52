"""``staging.write_atomic``: the one way a single file is written (results, tables, cached tensors)."""

import os

import pytest

from lightq import staging


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    staging.write_atomic(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def half_then_fail(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        staging.write_atomic(path, half_then_fail)
    assert path.read_text() == "new", "a failed write leaves the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"], "no temporary is left behind"


def test_file_lock_creates_its_file(tmp_path):
    with staging.file_lock(tmp_path / ".lock"):
        assert (tmp_path / ".lock").exists()

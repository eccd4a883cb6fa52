"""The converter against what a user's disk holds: their own folders, the source itself, full disks, files in the
way, typos in skip patterns, and the leftovers of killed conversions (issue 15, items 1, 6, 8, 10, 14)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from lightq import staging
from lightq.checkpoints.conventions import open_source

from .conftest import no_partials, one_line, snapshot


@pytest.fixture
def model(tmp_path, tiny_dit_folder):
    """A user's model folder: the tiny DiT's float files plus a file of their own."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dit_folder, folder)
    (folder / "notes.txt").write_text("my notes\n")
    return folder


@pytest.mark.parametrize("layout", ["blocks", "chunked"])
def test_overwrite_refuses_to_replace_the_source_folder(convert_cli, model, layout):
    before = snapshot(model)
    code, err, _ = convert_cli("source=" + str(model), f"output={model}", f"layout={layout}", "overwrite=true")
    assert code == 2
    one_line(err, "would replace the checkpoint being converted", "another path")
    assert snapshot(model) == before


def test_overwrite_refuses_a_folder_that_holds_the_source(convert_cli, model):
    before = snapshot(model)
    code, err, _ = convert_cli(f"source={model}", f"output={model.parent}", "layout=blocks", "overwrite=true")
    assert code == 2 and snapshot(model) == before
    one_line(err, "would replace the checkpoint being converted")


def test_overwrite_refuses_a_folder_of_the_users_files(convert_cli, tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\begin{document}")
    before = snapshot(mine)
    code, err, _ = convert_cli("source=tiny", f"output={mine}", "layout=blocks", "overwrite=true")
    assert code == 2 and snapshot(mine) == before
    one_line(err, "thesis.tex", "no lightq conversion wrote", "new or empty folder")


def test_overwrite_replaces_an_earlier_conversion_and_keeps_permissions_public(convert_cli, tmp_path):
    out = tmp_path / "dit-fp8"
    assert convert_cli("source=tiny", f"output={out}", "layout=chunked")[0] == 0
    code, err, _ = convert_cli("source=tiny", "scheme=int8", f"output={out}", "layout=chunked", "overwrite=true")
    assert code == 0, err
    assert open_source(out).metadata["lightq.scheme"] == "int8"
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~umask) for p in out.iterdir())
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)
    assert not no_partials(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["dit-fp8"]


def test_single_file_output_over_the_source_is_refused(convert_cli, tmp_path):
    src = tmp_path / "dit.safetensors"
    assert convert_cli("source=tiny", f"output={tmp_path / 'q.safetensors'}")[0] == 0
    from safetensors.torch import save_file

    from lightq.models.tiny import ensure_tiny

    full = open_source(ensure_tiny("tiny"))
    save_file({k: full[k] for k in full}, src)
    before = snapshot(tmp_path)
    code, err, _ = convert_cli(f"source={src}", f"output={src}", "overwrite=true")
    assert code == 2 and snapshot(tmp_path) == before
    one_line(err, "would replace the checkpoint being converted")


def test_converted_single_file_is_not_private(convert_cli, tmp_path):
    out = tmp_path / "q.safetensors"
    assert convert_cli("source=tiny", f"output={out}")[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_bad_shard_size_is_one_line(convert_cli, tmp_path, value):
    code, err, _ = convert_cli("source=tiny", f"output={tmp_path / 'out'}", "layout=chunked", f"shard_gb={value}")
    assert code == 2 and not list(tmp_path.iterdir())
    one_line(err, "shard_gb=", "number above 0")


def test_a_file_in_the_way_is_one_line(convert_cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err, _ = convert_cli("source=tiny", f"output={tmp_path / 'afile' / 'out.safetensors'}")
    assert code == 2 and (tmp_path / "afile").read_text() == "x"
    one_line(err, "afile", "a file is in the way")


@pytest.mark.parametrize("err_no, fix", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")])
def test_write_failures_are_one_line_and_keep_the_previous_output(convert_cli, tmp_path, monkeypatch, err_no, fix):
    out = tmp_path / "q.safetensors"
    assert convert_cli("source=tiny", f"output={out}")[0] == 0
    before = snapshot(tmp_path)
    from lightq.checkpoints import writers

    def failing_write(self, key, tensor):
        raise OSError(err_no, os.strerror(err_no), str(self._tmp))

    monkeypatch.setattr(writers.SafetensorsWriter, "write", failing_write)
    code, err, _ = convert_cli("source=tiny", "scheme=int8", f"output={out}", "overwrite=true")
    assert code == 2
    one_line(err, "the conversion failed", fix)
    assert snapshot(tmp_path) == before and not no_partials(tmp_path)


@pytest.mark.parametrize("layout", ["single", "blocks"])
def test_skip_pattern_that_matches_nothing_is_refused(convert_cli, tmp_path, layout):
    out = tmp_path / ("q.safetensors" if layout == "single" else "q")
    code, err, _ = convert_cli("source=tiny", f"output={out}", f"layout={layout}", "skip=[blocks.99.*]")
    assert code == 2 and not list(tmp_path.iterdir())
    one_line(err, "skip pattern 'blocks.99.*' matches none", "fix the pattern or remove it")


def test_a_killed_conversions_leftovers_are_removed_by_the_next_one(convert_cli, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "q.safetensors"
    left = tmp_path / f".q.safetensors.{staging.HOST}-{dead.pid}.abc123.partial"
    left.write_bytes(b"\0" * 1000)
    left_dir = tmp_path / f".q.{staging.HOST}-{dead.pid}.xyz.partial"
    left_dir.mkdir()
    (left_dir / "block_0.safetensors").write_bytes(b"\0")
    alive = tmp_path / f".q.safetensors.{staging.HOST}-{os.getppid()}.live01.partial"  # a running writer's
    alive.write_bytes(b"\0")
    other_host = tmp_path / f".q.safetensors.elsewhere-{dead.pid}.nfs001.partial"  # a shared filesystem's
    other_host.write_bytes(b"\0")
    assert convert_cli("source=tiny", f"output={out}")[0] == 0
    assert not left.exists() and not left_dir.exists()
    assert alive.exists() and other_host.exists()

"""rdm.io: atomic writes leave the old file or the new one; outputs are checked before work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rdm.io import (
    OutputError,
    atomic_write,
    replace_dir,
    require_writable,
    save_npy,
    sha256_file,
    write_json,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})

    def broken(tmp):
        tmp.write_text('{"v": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="a.json.*No space left.*free some disk space"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_save_npy_round_trip_and_checksum(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    save_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    (tmp_path / "b").write_bytes(b"abc")
    # sha256("abc"), FIPS 180-2 test vector
    assert sha256_file(tmp_path / "b") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_replace_dir_swaps_in_the_new_directory(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    (out / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    replace_dir(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_require_writable_refuses_before_work(tmp_path):
    require_writable(tmp_path / "new" / "deep" / "file.bin")  # creates the parents
    assert (tmp_path / "new" / "deep").is_dir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="a-file"):
        require_writable(tmp_path / "a-file" / "db", is_dir=True)
    with pytest.raises(OutputError, match="/proc/rdm-x"):
        require_writable("/proc/rdm-x/out.bin")
    with pytest.raises(OutputError, match="is a directory"):
        require_writable(tmp_path)


def test_replace_dir_puts_the_old_directory_back_when_the_swap_fails(tmp_path, monkeypatch):
    import os

    import rdm.io

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    (out / "old").write_text("old")
    tmp.mkdir()
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the rename of tmp onto out
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(rdm.io.os, "replace", flaky)
    with pytest.raises(OutputError, match="out"):
        replace_dir(tmp, out)
    assert (out / "old").read_text() == "old"

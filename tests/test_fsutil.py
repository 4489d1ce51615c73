import errno
import os

import pytest

from edgecompress.core.errors import DiskFullError
from edgecompress.core.fsutil import atomic_path, write_json


def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "report.json"
    write_json(final, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed half-way")
    assert final.read_text().strip().startswith('{\n  "v": 1')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_directory(tmp_path):
    final = tmp_path / "stage"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "b.bin").write_bytes(b"2")
            raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["a.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_disk_full_keeps_previous_state(tmp_path, monkeypatch):
    final = tmp_path / "report.json"
    write_json(final, {"v": 1})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk full while writing .*report.json; nothing was replaced"):
        write_json(final, {"v": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert '"v": 1' in final.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_jsonl_resume_skips_a_line_cut_short(tmp_path):
    from edgecompress.core.fsutil import append_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    assert read_jsonl(path, key=lambda r: r["k"]) == {}
    append_jsonl(path, {"k": 1, "v": "a"})
    append_jsonl(path, {"k": 2, "v": "b"})
    with open(path, "a") as f:
        f.write('{"k": 3, "v"')  # the process died mid-write
    assert read_jsonl(path, key=lambda r: r["k"]) == {1: {"k": 1, "v": "a"}, 2: {"k": 2, "v": "b"}}
    append_jsonl(path, {"k": 3, "v": "c"})  # the rerun redoes it, on a line of its own
    assert read_jsonl(path, key=lambda r: r["k"])[3] == {"k": 3, "v": "c"}

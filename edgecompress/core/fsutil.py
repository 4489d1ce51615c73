"""Writes that never leave a half-written file under a final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgecompress.core.errors import DiskFullError

# Below this much free space at the moment a write fails, the failure is taken as disk full:
# torch.save reports ENOSPC as an opaque RuntimeError ("unexpected pos ...").
_FULL_BELOW_BYTES = 1 << 20


def _disk_full(exc: BaseException, where: Path) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stat = os.statvfs(where)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _FULL_BELOW_BYTES


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    Works for files and directories. On any failure (or Ctrl-C) the temporary is
    removed and ``final`` keeps whatever it held before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp_target = tmp / final.name
    try:
        yield tmp_target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp_target, final)
    except DiskFullError as exc:  # from a nested write: name the artifact, not its temporary
        raise DiskFullError(f"disk full while writing {final}; nothing was replaced") from exc
    except (OSError, RuntimeError) as exc:
        if _disk_full(exc, tmp):
            raise DiskFullError(f"disk full while writing {final}; nothing was replaced") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through a ``.lock`` file beside it) for a read-modify-write: two processes
    that rewrite one file (a collection appending rows, a feature refresh) otherwise lose each other's writes."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(final: Path, data: Any) -> None:
    write_text(final, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where edgecompress keeps what it can rebuild: $EDGECOMPRESS_CACHE, else $XDG_CACHE_HOME/edgecompress or ~/.cache/edgecompress."""
    import os

    base = os.environ.get("EDGECOMPRESS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                               "edgecompress")
    return Path(base)


def read_jsonl(path: Path, key) -> dict:
    """The finished records of a resumable job, one JSON object a line, by ``key(record)``.

    A line cut short by an interruption is skipped, so its work is done again.
    """
    records = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[key(record)] = record
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Add one finished record (flushed to disk before returning, so a crash after it loses nothing)."""
    with open(path, "ab") as f:
        if f.tell() > 0:  # a line cut short by an interruption is closed first, or this record would join it
            with open(path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())

"""Files llmwarm writes (report, plot, bake manifest, profiles), written atomically.

`atomic(path, option)` yields a temporary path beside `path`; on success the temporary file is
flushed to disk and renamed over `path` (`os.replace`, atomic on POSIX), and the directory is
flushed too (the rename itself survives a crash), so a reader, a crash or a full disk leaves the
previous file or the new one, never half of one. The new file has the mode a plain write would
give it: the replaced file's, else what the umask allows (a sidecar or another replica running
as another user reads a report, learn file or bake manifest). A failure (full disk, read-only
directory, a directory in the way) raises `WriteError` naming the path and the option it came
from, and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from llmwarm.errors import WriteError


@contextlib.contextmanager
def atomic(path: Path, option: str) -> Iterator[Path]:
    """Write to the yielded temporary path; it replaces `path` when the block succeeds."""
    tmp: Path | None = None
    try:
        tmp = _temporary(path)
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(
            f"cannot write {path}", problems=[(option, f"{path}: {exc.strerror or exc}")]
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _temporary(path: Path) -> Path:
    """A new file beside `path`, created as `open` would create `path` itself: 0666 less the
    umask (mkstemp's 0600 would survive the rename), or the replaced file's own mode."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, path.stat().st_mode & 0o7777)
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_dir(directory: Path) -> None:
    # The file is in place already; a file system that cannot flush a directory (EINVAL on
    # some) keeps the rename all the same.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: Path, text: str, option: str) -> None:
    """`text` into `path`, atomically (UTF-8)."""
    with atomic(path, option) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def locked(lock: Path, how: int) -> Iterator[None]:
    """`flock` on a lock file that fleets share (`how`: `fcntl.LOCK_SH` or `LOCK_EX`), open for
    reading and writing: on NFS (EFS, Filestore, any RWX volume) Linux emulates `flock` with
    byte-range locks, and an exclusive one on a read-only descriptor fails (EBADF). In a
    read-only directory, which nobody can write into, the shared lock is taken on a read-only
    descriptor, or none when there is no lock file (nothing to wait for)."""
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDWR, os.O_RDONLY):
        if flags == os.O_RDONLY and how != fcntl.LOCK_SH:
            break
        with contextlib.suppress(OSError):
            fd = os.open(lock, flags, 0o666)
            break
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)

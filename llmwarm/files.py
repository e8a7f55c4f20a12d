"""Files llmwarm writes (report, plot, bake manifest, profiles), written atomically.

`atomic(path, option)` yields a temporary path beside `path`; on success the temporary file is
flushed to disk and renamed over `path` (`os.replace`, atomic on POSIX), so a reader, a crash
or a full disk leaves the previous file or the new one, never half of one. A failure (full
disk, read-only directory, a directory in the way) raises `WriteError` naming the path and the
option it came from, and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmwarm.errors import WriteError


@contextlib.contextmanager
def atomic(path: Path, option: str) -> Iterator[Path]:
    """Write to the yielded temporary path; it replaces `path` when the block succeeds."""
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise WriteError(
            f"cannot write {path}", problems=[(option, f"{path}: {exc.strerror or exc}")]
        ) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: Path, text: str, option: str) -> None:
    """`text` into `path`, atomically (UTF-8)."""
    with atomic(path, option) as tmp:
        tmp.write_text(text, encoding="utf-8")

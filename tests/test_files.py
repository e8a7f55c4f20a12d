"""Files llmwarm writes survive faults: a full disk or a read-only file system is a clear error
naming the path, and the previous file is intact (a real, small tmpfs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmwarm import files
from llmwarm.errors import WriteError
from llmwarm.model.report import write_json
from llmwarm.serve.display import plot
from tests.fakes import bucket, report


def _big_report() -> str:
    return "x" * 2_000_000  # more than the file system holds


def test_a_full_disk_names_the_path_and_keeps_the_previous_file(small_fs: Path) -> None:
    path = small_fs / "report.json"
    write_json(report(bucket()), path)
    before = path.read_text()
    with pytest.raises(WriteError) as info:
        files.write_text(path, _big_report(), "--report")
    assert info.value.problems[0].where == "--report"
    assert str(path) in info.value.problems[0].message
    assert "No space left on device" in info.value.problems[0].message
    assert path.read_text() == before
    assert sorted(p.name for p in small_fs.iterdir()) == ["report.json"]  # no temp file left


def test_a_read_only_file_system_names_the_path_and_keeps_the_previous_file(
    small_fs: Path,
) -> None:
    path = small_fs / "plot.png"
    plot(report(bucket()), path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(WriteError) as info:
        plot(report(bucket()), path)
    assert info.value.problems[0].where == "--plot"
    assert "Read-only file system" in info.value.problems[0].message
    assert path.read_bytes() == before


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    files.write_text(path, "old\n", "--report")
    files.write_text(path, "new\n", "--report")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_written_file_has_the_mode_a_plain_write_would_give(tmp_path: Path) -> None:
    # The defect: mkstemp's 0600 survived the rename, so a sidecar or another replica running
    # as another UID could not read a report, learn file or bake manifest.
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "report.json"
        files.write_text(path, "{}\n", "--report")
        assert path.stat().st_mode & 0o777 == 0o644
        # a file that exists keeps its own mode (an operator chmodded it)
        path.chmod(0o640)
        files.write_text(path, "{}\n", "--report")
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        files.write_text(tmp_path / "private.json", "{}\n", "--report")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)

"""DirectReader: whole-file reads with O_DIRECT, exact at every size, with a fallback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cache.directio import ALIGN, DirectReader


@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17, (1 << 20), (1 << 20) + 5])
def test_reads_exact_bytes_at_every_alignment(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "chunk"
    path.write_bytes(data)
    reader = DirectReader()
    got, ino = reader.read(str(path), size)
    assert got == data
    assert ino == path.stat().st_ino
    assert reader.direct  # this file system (the test's tmp dir) takes O_DIRECT


def test_a_longer_or_shorter_file_shows_in_the_length(tmp_path: Path) -> None:
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * 5000)
    reader = DirectReader()
    longer, _ = reader.read(str(path), 4096)  # recorded smaller than the file
    assert len(longer) == 4097
    shorter, _ = reader.read(str(path), 9000)  # recorded larger than the file
    assert len(shorter) == 5000


def test_buffers_are_reused_across_reads_without_leaking_old_bytes(tmp_path: Path) -> None:
    reader = DirectReader()
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"B" * 70000)
    small.write_bytes(b"s" * 10)
    assert reader.read(str(big), 70000)[0] == b"B" * 70000
    assert reader.read(str(small), 10)[0] == b"s" * 10


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DirectReader().read(str(tmp_path / "nope"), 10)


def test_falls_back_to_buffered_reads_where_o_direct_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Every local file system on this machine takes O_DIRECT, so the refusal (EINVAL
    # at open, as on some FUSE and network file systems) is injected.
    path = tmp_path / "chunk"
    path.write_bytes(b"abc" * 1000)
    real_open = os.open

    def refusing_open(p: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    reader = DirectReader()
    assert reader.read(str(path), 3000)[0] == b"abc" * 1000
    assert not reader.direct  # remembered: no second failed open per read
    assert reader.read(str(path), 3000)[0] == b"abc" * 1000

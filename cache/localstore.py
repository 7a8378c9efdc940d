"""A blob store in a local directory: the embedded default, no servers needed.

Every put writes a temporary file in the same directory, fsyncs it and renames it
into place, so a crash leaves either the old blob or the new one and never a torn
file; stray temporaries (``.tmp-*``) are ignored by reads and listings.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Callable, Iterator, Sequence

from cache.blobstore import BlobNotFound, BlobStoreError, validate_key

TMP_PREFIX = ".tmp-"


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` to ``fd`` (writev writes at most IOV_MAX buffers
    and may write less than asked)."""
    limit = getattr(os, "IOV_MAX", None) or 1024
    i = 0
    while i < len(views):
        batch = views[i:i + limit]
        n = os.writev(fd, batch)
        for v in batch:
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break


class LocalStore:
    """Blobs as files under ``root`` (created on first write)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, validate_key(key))

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(f"{self.url}: no blob {key}") from None
        except OSError as e:
            raise BlobStoreError(f"{self.url}: reading {key}: {e.strerror}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(f"{self.url}: no blob {key}") from None
        except OSError as e:
            raise BlobStoreError(f"{self.url}: opening {key}: {e.strerror}") from e
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        def write(fd: int) -> None:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)

        self._write(key, write)

    def _write(self, key: str, write: Callable[[int], None]) -> None:
        """Write a blob through ``write(fd)`` into a temporary file, fsync it and
        rename it into place."""
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
            try:
                try:
                    write(fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        except OSError as e:
            raise BlobStoreError(f"{self.url}: writing {key}: {e.strerror}") from e

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview]) -> None:
        """:meth:`put` of the concatenation of ``parts``, written with ``writev`` so the
        caller need not join them (the indexer's packs: a join of a 32 MiB pack was
        a fresh buffer to fault in and fill, for a copy the kernel makes anyway)."""
        views = [memoryview(p).cast("B") for p in parts]
        self._write(key, lambda fd: _writev_all(fd, views))

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            raise BlobNotFound(f"{self.url}: no blob {key}") from None

    def list(self, prefix: str) -> Iterator[str]:
        # Walk only the directory that can hold the prefix.
        head, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, head) if head else self.root
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if name.startswith(TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every key that starts with ``prefix``."""
        for key in self.list(prefix):
            try:
                yield key, os.stat(os.path.join(self.root, key)).st_size
            except FileNotFoundError:
                continue  # deleted while we listed

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def check(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise BlobStoreError(f"{self.url}: not a directory")
        probe = self.root
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK | os.X_OK) and not os.access(self.root, os.R_OK | os.X_OK):
            raise BlobStoreError(f"{self.url}: {errno.errorcode[errno.EACCES]}: not accessible")

"""A blob store in a local directory: the embedded default, no servers needed.

Every put writes a temporary file in the same directory, fsyncs it and renames it
into place, so a crash leaves either the old blob or the new one and never a torn
file; stray temporaries (``.tmp-*``) are ignored by reads and listings.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterator

from cache.blobstore import BlobNotFound, BlobStoreError, validate_key

TMP_PREFIX = ".tmp-"


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
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        except OSError as e:
            raise BlobStoreError(f"{self.url}: writing {key}: {e.strerror}") from e

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

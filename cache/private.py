"""Private directories and files: what imagefs keeps on a host is root's alone.

imagefs runs as root on images made by strangers, and what it keeps on disk (cached
chunks, index copies, packs' tables of contents, daemon logs and records, container
bundles) holds image content that the image itself may protect (a 0600 file of an image
is unreadable through the mount, but its bytes sit uncompressed in a cached chunk). So
every directory imagefs makes is 0700 and every file 0600, and a directory made by an
older version with a wider mode is tightened when it is opened again: a 0700 directory
closes everything below it, whatever the modes of files written before.

Only directories imagefs owns are tightened (its defaults such as /var/cache/imagefs,
and the subdirectories it makes inside any directory). A directory the user names
(``--cache-dir``, ``$IMAGEFS_RUN_DIR``) may be shared with other things (``/srv``,
``/tmp``): it is created 0700 when missing and otherwise left as it is; what imagefs
keeps inside it is private either way (0600 files, subdirectories tightened to 0700).
"""

from __future__ import annotations

import os
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600
_OTHERS = 0o077


def private_dir(path: str, *, owned: bool = True) -> str:
    """Make ``path`` a directory only its owner can enter (missing parents are made as
    ``os.makedirs`` makes them). ``owned``: the directory is imagefs's own, so an
    existing one with a wider mode is tightened to 0700; with ``owned=False`` (a
    directory the user named) an existing directory is left as it is.
    """
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    if owned:
        st = os.stat(path)
        if st.st_mode & _OTHERS:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~_OTHERS)
    return path


def private_fd(fd: int) -> None:
    """Take group and others' access away from an open file (one an older version made wider)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & _OTHERS:
        os.fchmod(fd, mode & ~_OTHERS)


def open_private(path: str, flags: int) -> int:
    """``os.open`` with O_CREAT and mode 0600; an existing file is tightened too."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        private_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path: str, *parts: bytes | bytearray | memoryview, prefix: str = ".tmp-") -> None:
    """Write ``parts`` to ``path`` as one private file (0600, its directory made 0700):
    a temporary file in the same directory, renamed over ``path``, so a reader sees the
    old file or the new one, never a part. No fsync: every copy kept this way is checked
    when it is read, and a torn one is fetched or written again."""
    import tempfile

    directory = os.path.dirname(path)
    private_dir(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

"""Read a file of an image as the container would see it, never through the host.

An image is made by a stranger: its ``/etc/passwd`` may be a symlink to ``/etc/shadow``
of the host, ``../../../etc/shadow``, a FIFO that blocks whoever opens it, or 4 GiB.
Opening ``os.path.join(rootfs, "etc/passwd")`` as root follows such a symlink on the
host. This module opens image paths with ``openat2(2)`` and ``RESOLVE_IN_ROOT``: the
kernel resolves every component, symlinks included, as if the image's root were ``/``
(absolute targets and ``..`` stay inside it), with its usual bound on the number of
links followed (40, then ELOOP), and without magic links (``/proc/self/...``) or other
mounts. Only a regular file is read, and only up to a size bound.

Why ``openat2`` on the image mount rather than a walk over the index: the kernel's
resolver is the reference for what the container will see, and the one used for
containers already (runc resolves mount destinations the same way); a second resolver
in Python would be security-critical code to keep in step with it, and reading the
bytes would need a second chunk reader in the CLI while the mount that serves them
verified is already up. Python has no binding for ``openat2`` (Linux >= 5.6), so it is
called through ``ctypes``; on an older kernel the error says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

# The syscall number is 437 on every architecture that has the unified syscall table
# (x86_64, aarch64, arm, riscv, ppc, s390: all added openat2 in Linux 5.6 as 437).
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

MAX_FILE_BYTES = 16 << 20  # /etc/passwd of a big directory is a few MB; more is not a database


class ImageFileError(Exception):
    """An image file exists but cannot be used (not a regular file, too big, unreadable)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def open_in_root(root_fd: int, path: str, flags: int = os.O_RDONLY) -> int:
    """``openat2(root_fd, path, flags, RESOLVE_IN_ROOT|...)``: a descriptor, or OSError.

    ``path`` is taken inside the tree at ``root_fd`` whether or not it starts with ``/``.
    """
    extra = os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY  # O_PATH takes few flags
    how = _OpenHow(flags | extra, 0, RESOLVE)
    fd = _libc.syscall(SYS_OPENAT2, ctypes.c_int(root_fd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise OSError(err, f"openat2 is not available (Linux >= 5.6 needed, this is {platform.release()})")
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def read_image_file(root: str, path: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of ``path`` in the image tree at ``root``; None if it does not exist.

    Raises :class:`ImageFileError` for anything else that is not a readable regular
    file of at most ``max_bytes`` (a FIFO, a device, a directory, a symlink loop).
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
            fd = open_in_root(root_fd, path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise ImageFileError(f"{path} in the image: {e.strerror}") from None
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileError(f"{path} in the image is not a regular file")
        if st.st_size > max_bytes:
            raise ImageFileError(f"{path} in the image is {st.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        data = b""
        while len(data) <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - len(data)))
            if not chunk:
                break
            data += chunk
        if len(data) > max_bytes:
            raise ImageFileError(f"{path} in the image is more than the {max_bytes} bytes allowed")
        return data
    except OSError as e:
        raise ImageFileError(f"{path} in the image: {e.strerror}") from None
    finally:
        os.close(fd)


def stat_in_image(root: str, path: str) -> os.stat_result | None:
    """``stat`` of ``path`` in the image tree at ``root`` (symlinks followed inside it);
    None if it does not exist."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_in_root(root_fd, path, os.O_PATH)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
            return None
        raise ImageFileError(f"{path} in the image: {e.strerror}") from None
    finally:
        os.close(root_fd)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


class CommandError(Exception):
    """The container's command cannot be executed; ``status`` is Docker's exit code for it."""

    NOT_FOUND = 127
    NOT_EXECUTABLE = 126

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


NOT_FOUND, NOT_EXECUTABLE = CommandError.NOT_FOUND, CommandError.NOT_EXECUTABLE


def look_path(root: str, command: str, path_env: str, cwd: str) -> str:
    """Find ``command`` in the image as runc will when it starts the container (Go's
    ``exec.LookPath`` with the container's PATH, in the container's working directory):
    the path it runs, or :class:`CommandError` with 127 (not found) or 126 (found,
    but a directory or without an execute bit)."""
    def resolve(p: str) -> str:
        return p if p.startswith("/") else os.path.normpath(os.path.join(cwd, p))

    if "/" in command:
        st = stat_in_image(root, resolve(command))
        if st is None:
            raise CommandError(f'exec: "{command}": stat {command}: no such file or directory', NOT_FOUND)
        if stat.S_ISDIR(st.st_mode) or not st.st_mode & 0o111:
            raise CommandError(f'exec: "{command}": permission denied', NOT_EXECUTABLE)
        return command
    for directory in path_env.split(":"):
        candidate = os.path.join(directory or ".", command)
        st = stat_in_image(root, resolve(candidate))
        if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_mode & 0o111:
            return candidate
    raise CommandError(f'exec: "{command}": executable file not found in $PATH', NOT_FOUND)

"""mount(2), umount2(2) and sysfs for EROFS mounts backed by regular files.

``mount(8)`` would turn a regular-file source into a loop device; the system call
mounts the file itself (``CONFIG_EROFS_FS_BACKED_BY_FILE``, Linux >= 6.12), and the
extra device named by ``device=`` may be a regular file too, even one on a FUSE mount.
The kernel reads both through their page cache with the credentials of the process
that mounted, so nothing here needs more than root.

Every EROFS mount gets a backing-device info of its own, named like its sysfs
directory (``erofs-N``); ``FS_IOC_GETFSSYSFSPATH`` (Linux >= 6.10) names it from an
open directory of the mount, which is how its readahead window is found.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
# Image mounts never let a device node or a setuid bit reach the host (as the FUSE mounts).
MOUNT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
# _IOR(0x15, 1, struct fs_sysfs_path { __u8 len; __u8 name[128]; })
FS_IOC_GETFSSYSFSPATH = (2 << 30) | (129 << 16) | (0x15 << 8) | 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_erofs(source: str, mountpoint: str, blob: str, extra_options: str = "") -> None:
    """Mount the EROFS metadata image ``source`` (a regular file) at ``mountpoint``,
    read-only, its extra device being the regular file ``blob``. Raises OSError."""
    if "," in blob or "=" in blob:
        raise OSError(errno.EINVAL, f"device path {blob!r} cannot be passed as a mount option")
    options = f"device={blob}" + (f",{extra_options}" if extra_options else "")
    if _libc.mount(os.fsencode(source), os.fsencode(mountpoint), b"erofs", MOUNT_FLAGS, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t erofs {source} {mountpoint} -o {options}: {os.strerror(err)}")


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """umount2(2): detach lazily when ``lazy`` (the mount goes once its last user does)."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


def sysfs_name(mountpoint: str) -> str | None:
    """The sysfs name (``erofs-N``, also its bdi's) of the filesystem at ``mountpoint``."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        buf = bytearray(129)
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    return buf[1: 1 + buf[0]].decode(errors="replace").rpartition("/")[2] or None


def set_read_ahead_kb(mountpoint: str, kb: int) -> bool:
    """Set the readahead window of the EROFS mount at ``mountpoint``; False if not possible."""
    name = sysfs_name(mountpoint)
    if name is None:
        return False
    try:
        with open(f"/sys/class/bdi/{name}/read_ahead_kb", "w") as f:
            f.write(f"{int(kb)}\n")
    except OSError:
        return False
    return True


__all__ = ["mount_erofs", "unmount", "sysfs_name", "set_read_ahead_kb", "MOUNT_FLAGS"]

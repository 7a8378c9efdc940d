"""A FUSE connection that outlives the process serving it (kernel side; see imagefs.supervisor).

The kernel keeps a FUSE connection, and so the mount, alive as long as any process holds
its open ``/dev/fuse`` file. So the mount daemon's long-lived process (the supervisor)
opens ``/dev/fuse`` and mounts with it itself, exactly as libfuse would (same source,
type, flags and options), and reads the one FUSE_INIT message the kernel sends. The
process that serves the mount (a pyfuse3 server) is started on ``/dev/fd/N``, where N is
one end of a SOCK_SEQPACKET socket pair holding a copy of that INIT: libfuse reads it,
negotiates, and calls ``Operations.init()`` before it replies, where the server puts the
real ``/dev/fuse`` file over fd N (:func:`adopt`). libfuse then reads the kernel directly;
nothing sits in the data path. The first server's INIT reply answers the kernel's INIT;
a later server's reply names a request the kernel finished long ago, which the kernel
refuses with ENOENT and libfuse ignores.

A server that dies leaves the requests it had read unanswered on the open file. A new
server writes the FUSE_NOTIFY_RESEND notification (Linux >= 6.9), and the kernel queues
them again. Measured on this machine (Linux 6.18, libfuse 3.14, pyfuse3 3.5) in
DESIGN.md "Surviving a mount daemon crash".

Everything here is root's way of mounting (mount(2)); see :func:`supported`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import stat
import struct

FUSE_DEVICE = "/dev/fuse"
FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
_IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_out_header: len, error (the notify code for a notification), unique (0)
_OUT_HEADER = struct.Struct("<IiQ")
# What a read of the device must be able to take (the kernel refuses smaller buffers).
READ_BUFFER = 1 << 20
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountArgs:
    """A pyfuse3/libfuse option set (``fsname=``, ``subtype=``, ``ro``,
    ``default_permissions``, ``allow_other``) as mount(2) takes it, with libfuse's
    defaults (nosuid, nodev)."""

    KNOWN = ("ro", "default_permissions", "allow_other")

    def __init__(self, options: set[str] | frozenset[str]) -> None:
        values = dict(o.split("=", 1) if "=" in o else (o, "") for o in options)
        unknown = set(values) - {"fsname", "subtype", *self.KNOWN}
        if unknown:
            raise ValueError(f"FUSE options this module cannot mount with: {', '.join(sorted(unknown))}")
        self.source = values.get("fsname") or "imagefs"
        self.fstype = "fuse." + values["subtype"] if values.get("subtype") else "fuse"
        self.flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if "ro" in values else 0)
        self.extra = [o for o in ("default_permissions", "allow_other") if o in values]

    def data(self, fd: int) -> str:
        return ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                         *self.extra])


def supported() -> bool:
    """Whether this process can hold FUSE connections itself: root (mount(2)) and the device."""
    return os.geteuid() == 0 and os.path.exists(FUSE_DEVICE)


class HeldConnection:
    """An open ``/dev/fuse`` mounted at ``mountpoint``, and the kernel's FUSE_INIT message."""

    def __init__(self, fd: int, init: bytes, mountpoint: str) -> None:
        self.fd = fd
        self.init = init
        self.mountpoint = mountpoint

    @classmethod
    def mount(cls, mountpoint: str, options: set[str] | frozenset[str], *, timeout: float = 10.0) -> "HeldConnection":
        """Open the device, mount it at ``mountpoint`` and read the kernel's INIT. Raises
        OSError (nothing is left mounted)."""
        args = MountArgs(options)
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            if _libc.mount(args.source.encode(), os.fsencode(mountpoint), args.fstype.encode(), args.flags,
                           args.data(fd).encode()) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount -t {args.fstype} {args.source} {mountpoint}: {os.strerror(err)}")
            try:
                init = _read_init(fd, timeout)
            except BaseException:
                unmount(mountpoint)
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, init, mountpoint)

    def connected(self) -> bool:
        """Whether the kernel still has the connection (not unmounted, not aborted)."""
        p = select.poll()
        p.register(self.fd, 0)
        return not any(ev & (select.POLLERR | select.POLLNVAL) for _fd, ev in p.poll(0))

    def init_socket(self) -> socket.socket:
        """A new socket whose peer will read this connection's INIT: the server's end.
        The other end is closed (the INIT waits in the socket's buffer)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.sendall(self.init)
        finally:
            ours.close()
        return theirs

    def close(self) -> None:
        """Let go of the connection: with no other holder, the kernel aborts it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_init(fd: int, timeout: float) -> bytes:
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(int(timeout * 1000)):
        raise OSError(errno.ETIMEDOUT, "the kernel sent no FUSE_INIT")
    msg = os.read(fd, READ_BUFFER)
    if len(msg) < _IN_HEADER.size or _IN_HEADER.unpack_from(msg)[1] != FUSE_INIT:
        raise OSError(errno.EPROTO, "the first FUSE message is not FUSE_INIT")
    return msg


def adopt(device_fd: int, session_fd: int, *, resend: bool) -> str | None:
    """(in ``Operations.init()`` of a server started on ``/dev/fd/<session_fd>``) Put the
    held ``/dev/fuse`` file over ``session_fd``; with ``resend``, ask the kernel to queue
    again what a previous server had read and not answered. Raises OSError if the
    connection cannot be taken over; returns why the resend failed (a kernel before
    6.9: the requests the dead server had taken are never answered), or None."""
    if not stat.S_ISCHR(os.fstat(device_fd).st_mode):
        raise OSError(errno.EBADF, f"fd {device_fd} is not the FUSE device")
    os.dup2(device_fd, session_fd, inheritable=False)
    os.close(device_fd)
    if resend:
        try:
            os.write(session_fd, _OUT_HEADER.pack(_OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
        except OSError as e:
            return e.strerror or str(e)
    return None


def unmount(mountpoint: str) -> None:
    """Detach a FUSE mount, lazily, as libfuse does for root. Raises OSError."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


__all__ = ["HeldConnection", "MountArgs", "adopt", "supported", "unmount", "FUSE_NOTIFY_RESEND"]

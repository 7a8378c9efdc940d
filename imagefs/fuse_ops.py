"""The pyfuse3 adapter: translate kernel requests into :mod:`imagefs.vfs` calls.

Semantics live in the VFS; this module only converts types and owns three decisions:

- Kernel caching. The image is immutable, so entries and attributes are cached for a
  long time, missing names are answered with a cached negative entry (``st_ino`` 0
  with an entry timeout: the kernel does not ask again), files open with
  ``keep_cache`` (page cache survives close/open) and never ``direct_io``.
- Errors. :class:`~imagefs.vfs.VFSError` becomes ``FUSEError`` here and nowhere
  else. Any other exception is logged, counted and answered as EIO: pyfuse3 catches
  only ``FUSEError``, and anything else would end ``pyfuse3.main()`` and leave a dead
  mount.
- Counters. Every request is counted by operation, so ``imagefs stats`` and tests can
  see what actually reached the filesystem (and what the kernel cache absorbed).

``fault`` is a test hook called with the operation name at the start of every
handler; whatever it raises travels the real error path.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections import Counter
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3

from imagefs.vfs import VFS, Attributes, VFSError

log = logging.getLogger(__name__)

# Entries and attributes never change for the life of a mount.
CACHE_TIMEOUT = 365 * 24 * 3600.0

FaultHook = Callable[[str], None]
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _handler(name: str) -> Callable[[_F], _F]:
    """Count a request, run the fault hook, and map every exception to FUSEError."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        async def handler(self: "FuseOps", *args: Any) -> Any:
            self.ops[name] += 1
            try:
                if self.fault is not None:
                    self.fault(name)
                return await fn(self, *args)
            except VFSError as e:
                self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
                raise pyfuse3.FUSEError(e.errno) from None
            except pyfuse3.FUSEError:
                raise
            except Exception:
                self.unexpected += 1
                self.errors["EIO"] += 1
                log.exception("unexpected error in %s%r: answering EIO", name, _printable(args))
                raise pyfuse3.FUSEError(errno.EIO) from None

        return handler  # type: ignore[return-value]

    return wrap


def _printable(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(a for a in args if isinstance(a, (int, bytes, str)))


def _entry(a: Attributes) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = a.blksize
    e.st_blocks = a.blocks
    e.st_atime_ns = a.time_ns
    e.st_mtime_ns = a.time_ns
    e.st_ctime_ns = a.time_ns
    return e


def _negative_entry() -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = CACHE_TIMEOUT
    return e


class FuseOps(pyfuse3.Operations):
    """pyfuse3 operations for one :class:`~imagefs.vfs.VFS`. File and directory
    handles are inode numbers: the filesystem keeps no per-open state."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, *, fault: FaultHook | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.fault = fault
        # Called by init(), while libfuse handles FUSE_INIT and before it replies: where a
        # server on a held connection takes it over (imagefs.fuse_session.adopt).
        self.on_init: Callable[[], None] | None = None
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unexpected = 0

    def counters(self) -> dict[str, Any]:
        """A snapshot of request counters (for stats and tests)."""
        return {"ops": dict(self.ops), "errors": dict(self.errors), "unexpected": self.unexpected}

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    # -- names and attributes --------------------------------------------------------

    @_handler("lookup")
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attrs = self.vfs.lookup(parent_inode, name)
        return _negative_entry() if attrs is None else _entry(attrs)

    @_handler("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.vfs.getattr(inode))

    @_handler("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(inode)

    # -- directories -----------------------------------------------------------------

    @_handler("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.vfs.opendir(inode)
        return inode

    @_handler("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # pyfuse3 always speaks readdirplus: each entry carries its attributes, so
        # the kernel needs no lookup per name after a listing.
        for next_id, name, attrs in self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, _entry(attrs), next_id):
                return

    @_handler("releasedir")
    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------

    @_handler("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.vfs.open(inode, flags)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_handler("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @_handler("release")
    async def release(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes are the index's and live as long as the mount: nothing to free.
        # (No reply is sent for forget, so this must never raise.)
        self.ops["forget"] += 1

    # -- xattrs, statfs, access ------------------------------------------------------

    @_handler("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.getxattr(inode, name)

    @_handler("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.vfs.listxattr(inode)

    @_handler("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.favail
        out.f_namemax = s.namemax
        return out

    @_handler("access")
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        groups: Sequence[int] = ()
        if ctx.uid != 0:
            try:
                groups = tuple(pyfuse3.get_sup_groups(ctx.pid))
            except OSError:  # the caller may already be gone
                groups = ()
        self.vfs.access(inode, mode, ctx.uid, ctx.gid, groups)  # EACCES/EROFS as errors
        return True

    # -- writes: the image is read-only ----------------------------------------------
    # The ``ro`` mount option makes the kernel refuse these first; answering EROFS
    # here keeps the filesystem correct even if it is mounted without it.

    async def _read_only(self, *args: Any) -> Any:
        raise VFSError(errno.EROFS, "read-only image")

    setattr = _handler("setattr")(_read_only)
    mknod = _handler("mknod")(_read_only)
    mkdir = _handler("mkdir")(_read_only)
    unlink = _handler("unlink")(_read_only)
    rmdir = _handler("rmdir")(_read_only)
    symlink = _handler("symlink")(_read_only)
    rename = _handler("rename")(_read_only)
    link = _handler("link")(_read_only)
    write = _handler("write")(_read_only)
    create = _handler("create")(_read_only)
    setxattr = _handler("setxattr")(_read_only)
    removexattr = _handler("removexattr")(_read_only)


__all__ = ["FuseOps", "CACHE_TIMEOUT", "FaultHook"]

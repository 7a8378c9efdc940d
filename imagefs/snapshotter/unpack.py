"""Apply one layer tar to an empty directory as an overlayfs layer.

Used only when a remote snapshot below an image's top must become real (see
:mod:`.materialize`); containerd unpacks every other layer itself. The result is what
containerd's overlay applier writes: the layer's own entries, its whiteouts
(``.wh.NAME``) as 0/0 character devices and its opaque markers (``.wh..wh..opq``) as the
``trusted.overlay.opaque`` xattr, so that stacked under overlayfs with the layers below
it, the tree is the image's.

The tar is a stranger's: every path is resolved inside the directory only. Names are
normalised and refused if absolute or escaping (``..``); no entry is created through
a symlink (every parent is checked with lstat, and files are opened ``O_NOFOLLOW``);
a hard link must point at an entry of this layer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import tarfile
from typing import BinaryIO

from imagefs.snapshotter.errors import FailedPrecondition

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
COPY_CHUNK = 1 << 20


class LayerError(FailedPrecondition):
    """A layer that cannot be applied safely; the message names the entry."""


def _clean(name: str, what: str) -> str:
    norm = posixpath.normpath("/" + name.lstrip("/")).lstrip("/")
    if not norm or norm == ".":
        return ""
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        raise LayerError(f"{what}: entry {name!r} escapes the layer")
    return norm


def _parent_dir(root: str, rel: str, what: str) -> str:
    """The real path of ``rel``'s parent inside ``root``, creating missing directories;
    refuses a parent that is not a directory (a symlink in particular)."""
    path = root
    for part in rel.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LayerError(f"{what}: {rel!r} would be created through {part!r}, which is not a directory")
    return path


def _check_parents(root: str, rel: str, what: str) -> None:
    """Refuse ``rel`` if a parent of it inside ``root`` is a symlink (or not a directory)."""
    path = root
    for part in rel.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise LayerError(f"{what}: {rel!r} goes through {part!r}, which is not a directory")
        except FileNotFoundError:
            return


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply_tar(stream: BinaryIO, root: str, what: str) -> None:
    """Extract the tar ``stream`` into the (empty) directory ``root``."""
    links: list[tuple[str, str]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            rel = _clean(member.name, what)
            if not rel:
                continue
            parent = _parent_dir(root, rel, what)
            base = rel.rsplit("/", 1)[-1]
            path = os.path.join(parent, base)
            if base == OPAQUE:
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
                continue
            if base.startswith(WHITEOUT):
                target = os.path.join(parent, base[len(WHITEOUT):])
                _remove(target)
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            if member.isdir():
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        _remove(path)
                        os.mkdir(path, 0o700)
                except FileNotFoundError:
                    os.mkdir(path, 0o700)
            elif member.islnk():
                links.append((path, _clean(member.linkname, what)))
                continue
            else:
                _remove(path)
                if member.isreg():
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        src = tar.extractfile(member)
                        assert src is not None
                        while chunk := src.read(COPY_CHUNK):
                            out.write(chunk)
                elif member.issym():
                    os.symlink(member.linkname, path)
                elif member.ischr() or member.isblk():
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
                elif member.isfifo():
                    os.mkfifo(path, 0o600)
                else:
                    raise LayerError(f"{what}: entry {member.name!r} has an unsupported type {member.type!r}")
            _attributes(path, member)
    for path, target in links:  # hard links last: their target may come later in the tar
        src = os.path.join(root, target)
        _check_parents(root, target, what)
        try:
            if stat.S_ISDIR(os.lstat(src).st_mode):
                raise LayerError(f"{what}: hard link to directory {target!r}")
        except FileNotFoundError:
            raise LayerError(f"{what}: hard link {path!r} points at {target!r}, which this layer does not have") from None
        _remove(path)
        os.link(src, path, follow_symlinks=False)


def _attributes(path: str, member: tarfile.TarInfo) -> None:
    os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, stat.S_IMODE(member.mode))
    for key, value in (member.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            with contextlib.suppress(OSError):
                os.setxattr(path, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
    try:
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise

"""An independent, deliberately naive model of applying OCI layers, to test against.

Why a second implementation: ``indexer/layers.py`` is fast and streaming, with its own
tar reader; this one is slow and obvious. It reads tars with :mod:`tarfile` (a
different parser), holds the image as a flat dict ``path -> object`` (a hardlink is two
keys holding the same object), and applies each layer in two plain steps taken from
the OCI image spec's "Applying changesets": first remove what the layer's whiteouts
and opaque markers name *from the lower layers*, then put the layer's entries in tar
order. It does not validate input: feed it only layers that layers.py accepts.

Three producers give the same comparable shape, ``dict[path bytes, Entry]`` (root is
``b""``): :func:`reference_tree` (from layer tars), :func:`tree_entries` (from an
``indexer.tree.Tree``) and :func:`dir_entries` (from a real directory, e.g. a FUSE
mount, via lstat/readlink/listxattr).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Callable
from urllib.parse import unquote_to_bytes

from indexer.tree import Tree


@dataclass(frozen=True)
class Entry:
    """What an image shows at one path, in a form every producer can give.

    ``size`` is the content size for files, the target length for symlinks and 0
    otherwise. ``sha256`` is the content's hex digest (files only). ``link_group`` is
    the smallest path among all names of the same non-directory inode when it has
    more than one name, else None.
    """

    type: str  # "dir", "file", "symlink", "char", "block", "fifo", "socket"
    mode: int  # full st_mode
    uid: int
    gid: int
    mtime_ns: int
    size: int
    rdev: int = 0
    link: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sha256: str | None = None
    link_group: bytes | None = None


def _type_name(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    raise ValueError(f"unknown file type in mode {mode:o}")


def _groups(identities: dict[bytes, object]) -> dict[bytes, bytes]:
    """path -> link group (smallest path) for identities shared by several paths."""
    by_id: dict[object, list[bytes]] = {}
    for path, ident in identities.items():
        by_id.setdefault(ident, []).append(path)
    return {p: min(paths) for paths in by_id.values() if len(paths) > 1 for p in paths}


# ----------------------------------------------------------------- from layer tars


@dataclass(eq=False)
class _Obj:
    """One inode of the model; hardlinked paths share the object."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    link: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None


_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG, tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _norm(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    return b"/".join(p for p in raw.split(b"/") if p not in (b"", b"."))


def _under(path: bytes, top: bytes) -> bool:
    """``path`` is ``top`` itself or inside it (``top`` b"" is the root: everything)."""
    return path == top or path.startswith(top + b"/") if top else True


def _xattrs(pax: dict[str, str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out.setdefault(key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"))
    for key, value in pax.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):]).decode("utf-8")
            out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return out


def _obj(m: tarfile.TarInfo, tf: tarfile.TarFile) -> _Obj:
    mtime = m.pax_headers.get("mtime")
    o = _Obj(
        mode=_TYPES[m.type] | (m.mode & 0o7777),
        uid=m.uid, gid=m.gid,
        mtime_ns=int(Decimal(mtime) * 10**9) if mtime else int(m.mtime) * 10**9,
        xattrs=_xattrs(m.pax_headers),
    )
    if m.isreg():
        f = tf.extractfile(m)
        assert f is not None
        o.data = f.read()
    elif m.issym():
        o.link = m.linkname.encode("utf-8", "surrogateescape")
    elif m.ischr() or m.isblk():
        o.rdev = os.makedev(m.devmajor, m.devminor)
    return o


def reference_tree(layers: list[bytes]) -> dict[bytes, Entry]:
    """The image that ``layers`` (uncompressed tars, lowest first) make."""
    fs: dict[bytes, _Obj] = {b"": _Obj(mode=stat.S_IFDIR | 0o755)}
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:", encoding="utf-8",
                          errors="surrogateescape") as tf:
            members = [(m, _norm(m.name)) for m in tf.getmembers()]
            entries = []
            # Step 1: whiteouts and opaque markers remove lower-layer paths.
            for m, path in members:
                parent, _, base = path.rpartition(b"/")
                if not base.startswith(b".wh."):
                    entries.append((m, path))
                elif base == b".wh..wh..opq":
                    for p in [p for p in fs if p != parent and _under(p, parent)]:
                        del fs[p]
                elif not base.startswith(b".wh..wh."):
                    victim = (parent + b"/" if parent else b"") + base[4:]
                    for p in [p for p in fs if _under(p, victim)]:
                        del fs[p]
            # Step 2: the layer's own entries, in order.
            for m, path in entries:
                parts = path.split(b"/") if path else []
                for i in range(1, len(parts)):
                    fs.setdefault(b"/".join(parts[:i]), _Obj(mode=stat.S_IFDIR | 0o755))
                if m.islnk():
                    new = fs[_norm(m.linkname)]
                else:
                    new = _obj(m, tf)
                old = fs.get(path)
                if old is not None and stat.S_ISDIR(old.mode) and stat.S_ISDIR(new.mode):
                    old.mode, old.uid, old.gid = new.mode, new.uid, new.gid
                    old.mtime_ns, old.xattrs = new.mtime_ns, new.xattrs
                    continue
                for p in [p for p in fs if p != path and _under(p, path)]:
                    del fs[p]
                fs[path] = new
    groups = _groups({p: id(o) for p, o in fs.items() if not stat.S_ISDIR(o.mode)})
    out = {}
    for path, o in fs.items():
        kind = _type_name(o.mode)
        out[path] = Entry(
            type=kind, mode=o.mode, uid=o.uid, gid=o.gid, mtime_ns=o.mtime_ns,
            size=len(o.data) if o.data is not None else len(o.link),
            rdev=o.rdev, link=o.link, xattrs=dict(o.xattrs),
            sha256=hashlib.sha256(o.data).hexdigest() if o.data is not None else None,
            link_group=groups.get(path),
        )
    return out


# ---------------------------------------------------------------------- from a Tree


def tree_entries(tree: Tree, content_of: Callable[[list[bytes]], str]) -> dict[bytes, Entry]:
    """The same shape from a merged :class:`Tree`.

    ``content_of(chunk digests)`` returns the sha256 hex digest of a file's content
    (the test's sink knows the bytes behind its digests).
    """
    walked = tree.walk()
    groups = _groups({p: id(n) for p, n in walked if not n.is_dir})
    out = {}
    for path, n in walked:
        kind = _type_name(n.mode)
        out[path] = Entry(
            type=kind, mode=n.mode, uid=n.uid, gid=n.gid, mtime_ns=n.mtime_ns,
            size=n.size if kind in ("file", "symlink") else 0,
            rdev=n.rdev if kind in ("char", "block") else 0,
            link=n.link_target, xattrs=dict(n.xattrs),
            sha256=content_of(n.chunks) if kind == "file" else None,
            link_group=groups.get(path),
        )
    return out


# ----------------------------------------------------------- from a real directory


def _file_sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def dir_entries(root_path: str | bytes) -> dict[bytes, Entry]:
    """The same shape from a real directory tree (a FUSE mount, an unpacked rootfs).

    Never follows symlinks. Hardlink groups come from (st_dev, st_ino).
    """
    root = os.fsencode(root_path)
    out: dict[bytes, Entry] = {}
    idents: dict[bytes, tuple[int, int]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        kind = _type_name(st.st_mode)
        link = os.readlink(full) if kind == "symlink" else b""
        xattrs = {name: os.getxattr(full, name, follow_symlinks=False)
                  for name in os.listxattr(full, follow_symlinks=False)}
        out[rel] = Entry(
            type=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
            size=st.st_size if kind in ("file", "symlink") else 0,
            rdev=st.st_rdev if kind in ("char", "block") else 0,
            link=link, xattrs=xattrs,
            sha256=_file_sha256(full) if kind == "file" else None,
        )
        if kind == "dir":
            for name in os.listdir(full):
                stack.append(os.path.join(rel, name) if rel else name)
        else:
            idents[rel] = (st.st_dev, st.st_ino)
    for path, group in _groups(idents).items():  # type: ignore[arg-type]
        out[path] = replace(out[path], link_group=group)
    return out

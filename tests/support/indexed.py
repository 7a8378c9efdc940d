"""Read an indexed image back through the index reader and the store, in the
reference's comparable shape (``dict[path, Entry]``), so build tests can compare an
index entry by entry with an independent extraction."""

from __future__ import annotations

import hashlib
import stat
from dataclasses import replace

from cache.blobstore import BlobStore
from cache.chunk import open_chunk
from indexer.index import ROOT_INO, Index
from tests.support.reference import Entry, _groups, _type_name


def file_bytes(index: Index, store: BlobStore, ino: int) -> bytes:
    size = index.inode(ino).size
    return b"".join(
        open_chunk(ref, store.get_range(ref.pack, ref.offset, ref.clen))
        for _off, ref in index.chunks_for_range(ino, 0, size)
    )


def index_entries(index: Index, store: BlobStore) -> dict[bytes, Entry]:
    out: dict[bytes, Entry] = {}
    inos: dict[bytes, int] = {}
    stack: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
    while stack:
        path, ino = stack.pop()
        node = index.inode(ino)
        kind = _type_name(node.mode)
        if kind != "dir":
            inos[path] = ino
        sha = hashlib.sha256(file_bytes(index, store, ino)).hexdigest() if kind == "file" else None
        out[path] = Entry(
            type=kind, mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns,
            size=node.size if kind in ("file", "symlink") else 0,
            rdev=node.rdev if kind in ("char", "block") else 0,
            link=index.readlink(ino) if stat.S_ISLNK(node.mode) else b"",
            xattrs={n.decode(): v for n, v in index.xattrs(ino)},
            sha256=sha,
        )
        if stat.S_ISDIR(node.mode):
            for _i, name, child in index.readdir(ino):
                stack.append((path + b"/" + name if path else name, child))
    for path, group in _groups(inos).items():  # type: ignore[arg-type]
        out[path] = replace(out[path], link_group=group)
    return out

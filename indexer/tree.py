"""The merged file tree of an image, as the layer merge builds it.

A plain in-memory model: no I/O, no encoding. Hardlinks are two names that refer to
the same :class:`Node` object, which is how the index later gives them one inode.
Regular files carry the digests of their chunks, not their bytes: content is chunked
as the layer is read, so the tree stays small even for multi-GB images.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

# The longest name Linux accepts for one path component.
NAME_MAX = 255


@dataclass(eq=False)
class Node:
    """One inode: a directory, regular file, symlink, device, fifo or socket.

    ``mode`` is the full st_mode (type bits included). ``rdev`` is ``os.makedev`` of a
    device's major/minor. ``chunks`` lists the chunk digests of a regular file's content
    in order (every chunk but the last is exactly the chunk size). ``children`` is only
    used for directories.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    link_target: bytes = b""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    children: dict[bytes, "Node"] | None = None

    def __post_init__(self) -> None:
        if stat.S_ISDIR(self.mode) and self.children is None:
            self.children = {}

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def new_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> Node:
    return Node(mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid, mtime_ns=mtime_ns)


class Tree:
    """The root directory of a merged image plus path helpers.

    Paths are bytes, relative, '/'-separated, already normalised by the caller
    (the layer merge refuses '..', absolute paths and NUL before it gets here).
    """

    def __init__(self) -> None:
        self.root = new_dir(0o755)

    def walk(self) -> "list[tuple[bytes, Node]]":
        """Every (path, node) in depth-first, name-sorted order; root is ``b''``.

        This is "tree order", the default chunk layout until a profile exists.
        A hardlinked node appears once per name.
        """
        out: list[tuple[bytes, Node]] = []
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            out.append((path, node))
            if node.children:
                prefix = path + b"/" if path else b""
                for name in sorted(node.children, reverse=True):
                    stack.append((prefix + name, node.children[name]))
        return out

    def get(self, path: bytes) -> Node | None:
        """The node at ``path`` without following symlinks, or None."""
        node = self.root
        if not path:
            return node
        for part in path.split(b"/"):
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

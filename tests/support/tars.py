"""Build layer tars for tests: every feature a layer can carry, from a short list of entries.

Why a builder on top of :mod:`tarfile` (the writer) rather than hand-made bytes: the
layer merge has its own tar reader, so tars written by an independent, widely used
writer check it against the format as others produce it. What tarfile cannot say
directly (nanosecond mtimes, binary xattrs, libarchive's xattr records) goes in as PAX
records, exactly as GNU tar, star and libarchive write them.

Content can be given as bytes or *generated*: ``generated_file(name, size, seed)``
produces deterministic bytes on the fly (every 1 MiB block distinct, so chunks never
repeat), which is how a > 4 GiB file is built without holding it: see
:func:`big_file_layer` (a readable tar stream) and :func:`write_big_file_layer`.

:func:`feature_layers` is the shared fixture: a few layers that together exercise
every feature of the merge; tests compare the result with ``tests.support.reference``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import random
import shutil
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Sequence
from urllib.parse import quote

MiB = 1 << 20
# A fixed, plausible default mtime (2023-11-14) so trees are reproducible.
DEFAULT_MTIME_NS = 1_700_000_000 * 10**9
BLOCK = 512

_KINDS = {"file", "contiguous", "dir", "symlink", "hardlink", "char", "block", "fifo"}
_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "contiguous": tarfile.CONTTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8")


def _s(b: bytes) -> str:
    """Bytes as tarfile wants them: str that encodes back to the same bytes."""
    return b.decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------- generated content


@functools.lru_cache(maxsize=8)
def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(MiB)


def _block(seed: int, index: int) -> bytes:
    """Block ``index`` of a generated stream: random bytes stamped with (seed, index)."""
    return seed.to_bytes(8, "big") + index.to_bytes(8, "big") + _pattern(seed)[16:]


class GeneratedContent(io.RawIOBase):
    """``size`` deterministic bytes for ``seed``, produced as they are read.

    Every 1 MiB block differs (it starts with the block number), so no two chunks of
    a file, or of two files with different seeds, are equal.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__()
        self.size = size
        self.seed = seed
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        left = self.size - self.pos
        if n is None or n < 0 or n > left:
            n = left
        out = []
        want = n
        while want:
            index, off = divmod(self.pos, MiB)
            take = min(want, MiB - off)
            out.append(_block(self.seed, index)[off:off + take])
            self.pos += take
            want -= take
        return b"".join(out)

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


def generated_bytes(size: int, seed: int = 0) -> bytes:
    """The whole generated content (for sizes that fit comfortably in memory)."""
    return GeneratedContent(size, seed).read()


def generated_sha256(size: int, seed: int = 0) -> str:
    """sha256 hex of the generated content, computed block by block."""
    h = hashlib.sha256()
    g = GeneratedContent(size, seed)
    while data := g.read(4 * MiB):
        h.update(data)
    return h.hexdigest()


# ------------------------------------------------------------------------- entries


@dataclass
class TarEntry:
    """One member to write. Build it with the helpers below rather than directly."""

    name: bytes
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    data: bytes = b""
    gen_size: int | None = None  # generated content of this size instead of ``data``
    seed: int = 0
    target: bytes = b""  # symlink target or hardlink target path
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # as SCHILY.xattr.* records
    libarchive_xattrs: dict[str, bytes] = field(default_factory=dict)  # as LIBARCHIVE.xattr.*
    pax: dict[str, bytes] = field(default_factory=dict)  # any further raw PAX records

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"{self.name!r}: unknown kind {self.kind!r} (one of {sorted(_KINDS)})")

    @property
    def size(self) -> int:
        return self.gen_size if self.gen_size is not None else len(self.data)

    def content(self) -> BinaryIO:
        if self.gen_size is not None:
            return GeneratedContent(self.gen_size, self.seed)  # type: ignore[return-value]
        return io.BytesIO(self.data)

    def content_sha256(self) -> str:
        if self.gen_size is not None:
            return generated_sha256(self.gen_size, self.seed)
        return hashlib.sha256(self.data).hexdigest()


def file(name: str | bytes, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
         mtime_ns: int = DEFAULT_MTIME_NS, xattrs: dict[str, bytes] | None = None,
         libarchive_xattrs: dict[str, bytes] | None = None) -> TarEntry:
    """A regular file with the given bytes."""
    return TarEntry(_b(name), "file", mode, uid, gid, mtime_ns, data=data, xattrs=dict(xattrs or {}),
                    libarchive_xattrs=dict(libarchive_xattrs or {}))


def generated_file(name: str | bytes, size: int, seed: int = 0, *, mode: int = 0o644, uid: int = 0,
                   gid: int = 0, mtime_ns: int = DEFAULT_MTIME_NS) -> TarEntry:
    """A regular file of ``size`` generated bytes (see :class:`GeneratedContent`)."""
    return TarEntry(_b(name), "file", mode, uid, gid, mtime_ns, gen_size=size, seed=seed)


def contiguous(name: str | bytes, data: bytes = b"", *, mode: int = 0o644) -> TarEntry:
    """A contiguous file (type '7'), which readers treat as regular."""
    return TarEntry(_b(name), "contiguous", mode, data=data)


def directory(name: str | bytes, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
              mtime_ns: int = DEFAULT_MTIME_NS, xattrs: dict[str, bytes] | None = None) -> TarEntry:
    return TarEntry(_b(name), "dir", mode, uid, gid, mtime_ns, xattrs=dict(xattrs or {}))


def symlink(name: str | bytes, target: str | bytes, *, uid: int = 0, gid: int = 0,
            mtime_ns: int = DEFAULT_MTIME_NS) -> TarEntry:
    return TarEntry(_b(name), "symlink", 0o777, uid, gid, mtime_ns, target=_b(target))


def hardlink(name: str | bytes, target: str | bytes) -> TarEntry:
    """A second name for the file at ``target`` (a path inside the image)."""
    return TarEntry(_b(name), "hardlink", 0o644, target=_b(target))


def char_device(name: str | bytes, major: int, minor: int, *, mode: int = 0o666, uid: int = 0,
                gid: int = 0) -> TarEntry:
    return TarEntry(_b(name), "char", mode, uid, gid, major=major, minor=minor)


def block_device(name: str | bytes, major: int, minor: int, *, mode: int = 0o660, uid: int = 0,
                 gid: int = 0) -> TarEntry:
    return TarEntry(_b(name), "block", mode, uid, gid, major=major, minor=minor)


def fifo(name: str | bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> TarEntry:
    return TarEntry(_b(name), "fifo", mode, uid, gid)


def _join(parent: bytes, name: bytes) -> bytes:
    parent = parent.rstrip(b"/")
    return parent + b"/" + name if parent and parent != b"." else name


def whiteout(path: str | bytes) -> TarEntry:
    """The marker that removes ``path`` (from lower layers)."""
    p = _b(path).rstrip(b"/")
    parent, _, base = p.rpartition(b"/")
    return file(_join(parent, b".wh." + base))


def opaque(dir_path: str | bytes) -> TarEntry:
    """The marker that hides everything lower layers put in ``dir_path``."""
    return file(_join(_b(dir_path), b".wh..wh..opq"))


# ------------------------------------------------------------------------- writing


def _mtime_text(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), 10**9)
    return f"{sign}{whole}.{frac:09d}"


def _tarinfo(e: TarEntry, fmt: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_s(e.name))
    ti.type = _TAR_TYPES[e.kind]
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = e.mtime_ns // 10**9
    ti.size = e.size if e.kind in ("file", "contiguous") else 0
    ti.linkname = _s(e.target)
    ti.devmajor, ti.devminor = e.major, e.minor
    pax: dict[str, str] = {}
    if e.mtime_ns % 10**9:
        pax["mtime"] = _mtime_text(e.mtime_ns)
    for k, v in e.xattrs.items():
        pax["SCHILY.xattr." + k] = _s(v)
    for k, v in e.libarchive_xattrs.items():
        # libarchive percent-encodes the name and writes unpadded base64.
        pax["LIBARCHIVE.xattr." + quote(k, safe="")] = base64.b64encode(v).decode().rstrip("=")
    for k, v in e.pax.items():
        pax[k] = _s(v)
    if pax:
        if fmt != tarfile.PAX_FORMAT:
            raise ValueError(f"{e.name!r}: xattrs, PAX records and sub-second mtimes need the PAX format")
        ti.pax_headers = pax
    return ti


_FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def make_tar(entries: Iterable[TarEntry], fmt: str = "pax") -> bytes:
    """A tar of ``entries``, in order (``fmt``: "pax" (default), "gnu" or "ustar")."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown tar format {fmt!r} (one of {sorted(_FORMATS)})")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=_FORMATS[fmt], encoding="utf-8",
                      errors="surrogateescape") as tf:
        for e in entries:
            ti = _tarinfo(e, _FORMATS[fmt])
            tf.addfile(ti, e.content() if ti.size else None)
    return buf.getvalue()


class _Concat(io.RawIOBase):
    """Several byte strings and streams read back to back as one stream."""

    def __init__(self, parts: Sequence[bytes | BinaryIO]) -> None:
        super().__init__()
        self._parts = [io.BytesIO(p) if isinstance(p, bytes) else p for p in parts]
        self._i = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(p.read() for p in self._parts[self._i:])
        out = []
        while n and self._i < len(self._parts):
            data = self._parts[self._i].read(n)
            if not data:
                self._i += 1
                continue
            out.append(data)
            n -= len(data)
        return b"".join(out)

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


BIG_FILE_NAME = b"big/huge.bin"
AFTER_BIG_NAME = b"big/after"
AFTER_BIG_DATA = b"the header after a huge file is found at the right offset\n"


def big_file_layer(size: int, seed: int = 7, name: bytes = BIG_FILE_NAME) -> BinaryIO:
    """A readable PAX tar stream holding one generated file of ``size`` bytes, produced
    as it is read (nothing of that size is ever in memory), followed by the small file
    ``AFTER_BIG_NAME`` (so a reader must find the header after the huge content).

    Expected content: :class:`GeneratedContent` ``(size, seed)``.
    """
    head = generated_file(name, size, seed)
    after = file(AFTER_BIG_NAME, AFTER_BIG_DATA)
    parts: list[bytes | BinaryIO] = []
    for e in (head, after):
        ti = _tarinfo(e, tarfile.PAX_FORMAT)
        parts.append(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        parts.append(e.content())
        parts.append(b"\0" * (-e.size % BLOCK))
    parts.append(b"\0" * (2 * BLOCK))
    return _Concat(parts)  # type: ignore[return-value]


def write_big_file_layer(path: str, size: int, seed: int = 7, name: bytes = BIG_FILE_NAME) -> None:
    """Write :func:`big_file_layer` to ``path`` (e.g. as a layer blob for an OCI layout)."""
    with open(path, "wb") as out:
        shutil.copyfileobj(big_file_layer(size, seed, name), out, 4 * MiB)


# ------------------------------------------------------------------ feature layers

# A real file capability: version 2, cap_net_raw permitted + effective (ping's).
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")
LONG_DIR = "opt/" + "d" * 70
LONG_NAME = LONG_DIR + "/" + "long-file-name-" + "f" * 60  # > 100 bytes: a PAX path
GNU_LONG_NAME = "srv/" + "g" * 130  # > 100 bytes, written by the GNU format as an 'L' record
GNU_LONG_TARGET = "/" + "/".join(["target"] * 25)  # > 100 bytes: a 'K' record
NS_MTIME = 1_700_000_000_123_456_789
BIG_UID = 3_000_000  # above the ustar octal field: a PAX uid / GNU base-256


def feature_layers() -> list[bytes]:
    """Four layers (PAX, PAX, GNU, PAX) that together exercise every merge feature."""
    base = [
        directory("./", mode=0o755, mtime_ns=DEFAULT_MTIME_NS + 1),
        directory("etc", mtime_ns=NS_MTIME),
        file("etc/hostname", b"base\n"),
        file("etc/empty", b""),
        directory("usr"),
        directory("usr/bin"),
        file("usr/bin/tool", b"#!tool v1\n", mode=0o4755),
        hardlink("usr/bin/tool-hl", "usr/bin/tool"),
        file("usr/bin/wall", b"wall\n", mode=0o2755, gid=5),
        file("usr/bin/ping", b"ping\n", mode=0o755,
             xattrs={"security.capability": CAPABILITY, "user.note": b"ping\xff\x00bin"}),
        symlink("usr/bin/sh", "dash"),
        contiguous("usr/bin/contig", b"a contiguous file\n", mode=0o755),
        generated_file("usr/lib/libbig.so", 3 * MiB + MiB // 2 + 123, seed=1, mode=0o755),
        symlink("lib", "usr/lib"),
        directory("tmp", mode=0o1777),
        char_device("dev/null", 1, 3),
        block_device("dev/sda", 8, 0, gid=6),
        fifo("run/initctl", mode=0o600),
        directory("home/user", mode=0o700, uid=1000, gid=1000),
        file("home/user/.profile", b"PS1='$ '\n", uid=1000, gid=1000, mtime_ns=NS_MTIME),
        file(LONG_NAME, b"a name longer than 100 bytes\n"),
        file("var/big-ids", b"ids\n", uid=BIG_UID, gid=BIG_UID + 1),
        directory("opt/app"),
        file("opt/app/old1", b"old1\n"),
        file("opt/app/sub/old2", b"old2\n"),
        directory("replace_me_dir"),
        file("replace_me_dir/child", b"child\n"),
        file("replace_me_file", b"was a file\n"),
        directory("gone"),
        file("gone/a", b"a\n"),
        file("gone/deep/b", b"b\n"),
        file("gone_file", b"bye\n"),
    ]
    second = [
        whiteout("gone"),
        whiteout("gone_file"),
        whiteout("never-there"),
        file("opt/app/new1", b"new1 (before the opaque marker)\n"),
        opaque("opt/app"),
        file("opt/app/new2", b"new2 (after the opaque marker)\n"),
        file("replace_me_dir", b"now a file\n"),
        directory("replace_me_file", mode=0o750),
        file("replace_me_file/inside", b"inside\n"),
        hardlink("usr/bin/libbig-hl", "usr/lib/libbig.so"),
        directory("etc", mode=0o750, gid=4, mtime_ns=NS_MTIME + 1, xattrs={"user.dir": b"etc"}),
        file("etc/hostname", b"layer two\n", mtime_ns=NS_MTIME + 2),
        file("etc/libarchive", b"x\n", libarchive_xattrs={"user.bin": b"\x00\xff\x10", "user.sp ace%": b"v"}),
        generated_file("data/blob", 2 * MiB + MiB // 4, seed=2),
        file("data/mtime-neg", b"before 1970\n", mtime_ns=-1_500_000_000),
    ]
    third = [  # GNU format: 'L'/'K' long names, base-256 ids
        file(GNU_LONG_NAME, b"gnu long name\n"),
        symlink("srv/longlink", GNU_LONG_TARGET),
        file("usr/bin/tool", b"#!tool v2\n", mode=0o755),  # tool-hl keeps v1
        whiteout("usr/bin/sh"),
        file("srv/gnu-ids", b"ids\n", uid=BIG_UID + 2, gid=BIG_UID + 3),
        directory("tmp", mode=0o1777, mtime_ns=DEFAULT_MTIME_NS + 3 * 10**9),
    ]
    fourth = [
        hardlink("srv/hl-to-gnu-long", GNU_LONG_NAME),
        file(GNU_LONG_NAME, b"replaced after being linked\n"),
        symlink("replace_me_file", "elsewhere"),  # a directory becomes a symlink
        opaque("fresh"),  # opaque over nothing: no effect
        directory("fresh"),
        file("fresh/file", b"fresh\n"),
    ]
    return [make_tar(base), make_tar(second), make_tar(third, "gnu"), make_tar(fourth)]


# ------------------------------------------------------------- hand-made members
# For malformed input that no honest writer produces: raw header blocks to splice.

END = b"\0" * (2 * BLOCK)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def with_checksum(block: bytes) -> bytes:
    """``block`` (one 512-byte header) with its checksum field recomputed."""
    blank = block[:148] + b" " * 8 + block[156:]
    return blank[:148] + b"%06o\0 " % sum(blank) + blank[156:]


def raw_header(name: bytes, typeflag: bytes = b"0", size: int = 0, *, linkname: bytes = b"",
               mode: int = 0o644, magic: bytes = b"ustar\x0000") -> bytes:
    """One ustar header block, byte by byte, with a valid checksum."""
    if len(name) > 100 or len(linkname) > 100:
        raise ValueError("raw_header names are limited to 100 bytes (use a PAX record)")
    block = (
        name.ljust(100, b"\0") + _octal(mode, 8) + _octal(0, 8) + _octal(0, 8)
        + _octal(size, 12) + _octal(DEFAULT_MTIME_NS // 10**9, 12) + b" " * 8 + typeflag
        + linkname.ljust(100, b"\0") + magic + b"\0" * 32 * 2 + _octal(0, 8) * 2
    ).ljust(BLOCK, b"\0")
    return with_checksum(block)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"<len> key=value\\n"`` record, its length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def raw_member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **kw: object) -> bytes:
    """A header whose size field is ``len(data)``, then the data padded to the block size."""
    return raw_header(name, typeflag, len(data), **kw) + data + b"\0" * (-len(data) % BLOCK)  # type: ignore[arg-type]


def raw_pax(records: dict[bytes, bytes], typeflag: bytes = b"x") -> bytes:
    """A PAX extended header (``x``) or global header (``g``) carrying ``records``."""
    return raw_member(b"PaxHeader", b"".join(pax_record(k, v) for k, v in records.items()), typeflag)
